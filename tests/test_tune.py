"""`lazydit tune`: candidates within the budget (TMACs or timed seconds), successive halving, ties, resuming, FID to
data beside the distance to the fine sampler, recipes (Python, `lazydit sample --recipe`, diffusers pipelines).
Tiny random models, a few images each."""

import json

import pytest
import torch

from lazydit.errors import UsageError
from lazydit.models.cost import sampling_macs
from lazydit.tuning import gate_steps, load_recipe, tune

from conftest import tiny_model

FAST = dict(num_samples=8, n0=4, fine="ddim-20", progress=False, log=lambda m: None, gate_iters=4)


def rows_of(folder):
    return [json.loads(p.read_text()) for p in (folder / "rows").glob("*-n*.json")]


def test_pruning_never_scores_a_candidate_over_the_budget(tmp_path):
    model = tiny_model()
    budget = 0.3 * sampling_macs(model.config, 50)
    recipe = tune(model, 0.3, tmp_path, **FAST)
    recs = rows_of(tmp_path)
    assert len({r["config"] for r in recs}) > 10  # the whole candidate grid ran
    assert any(r["n"] == 8 for r in recs) and any(r["n"] == 4 for r in recs)  # two rounds
    for r in recs:
        scored = "mse_to_fine" in r
        assert scored != bool(r.get("over_budget")), r
        if scored:
            assert r["tmacs"] * 1e12 <= budget, r
    # halving: at most half (and at least two) of the first round go on
    first = [r for r in recs if r["n"] == 4 and "mse_to_fine" in r]
    second = [r for r in recs if r["n"] == 8]
    assert 2 <= len(second) <= max(2, -(-len(first) // 2))
    assert recipe["tmacs"] * 1e12 <= budget
    table = json.loads((tmp_path / "frontier.json").read_text())["rows"]
    assert all(r["tmacs"] * 1e12 <= budget for r in table)
    assert [r["status"] for r in table].count("chosen") == 1
    for name in ("recipe.json", "frontier.md", "frontier.csv", "frontier.png", "report.md"):
        assert (tmp_path / name).is_file()
    assert any("bare sampler" in d["why"] or "over the budget" in d["why"] for d in recipe["not_tried"])
    # a model that is not the embedded default gets forecast gates trained for it, as candidates
    trained = [r for r in recs if "lazy:gates=" in r["config"]]
    assert trained and all(str(tmp_path / "gates") in r["config"] for r in trained)
    assert any("gates trained here" in n for n in recipe["notes"])
    assert sorted(p.parent.name for p in (tmp_path / "gates").glob("*/gates.safetensors")) == [
        f"forecast-T{T}" for T in gate_steps(model.config, budget)]


def test_an_explicit_over_budget_configuration_is_not_scored(tmp_path):
    recipe = tune(tiny_model(), 0.2, tmp_path, configs=["ddim-8", "ddim-20"], **FAST)  # DDIM-20: 40% of DDIM-50
    assert {r["config"] for r in rows_of(tmp_path)} == {"ddim-8"}
    assert recipe["config"] == "ddim-8"
    assert any(d["what"] == "ddim-20" for d in recipe["not_tried"])


CONFIGS = ["ddim-5", "ddim-8", "dpm++2m-8", "ddim-25+fora:interval=2", "ddim-20+teacache:target=0.31"]
SAME = ("config", "threshold", "fitted", "tmacs", "quality")


def test_an_interrupted_tune_resumes_to_the_same_recipe(tmp_path):
    model = tiny_model()
    whole = tune(model, 0.3, tmp_path / "whole", configs=CONFIGS, **FAST)
    cut = tune(model, 0.3, tmp_path / "cut", configs=CONFIGS, max_runs=3, **FAST)  # stopped in the first round
    assert any("ran out" in d["why"] for d in cut["not_tried"])
    assert len(rows_of(tmp_path / "cut")) == 3
    again = tune(model, 0.3, tmp_path / "cut", configs=CONFIGS, **FAST)
    assert {k: again[k] for k in SAME} == {k: whole[k] for k in SAME}
    assert not any("ran out" in d["why"] for d in again["not_tried"])
    with pytest.raises(UsageError, match="other settings"):  # a resume with other settings is refused
        tune(model, 0.3, tmp_path / "cut", configs=CONFIGS, **{**FAST, "num_samples": 16})


def test_a_tie_is_reported_and_the_cheaper_is_picked(tmp_path):
    # FBCache at threshold 0 never skips: the same images as DDIM-6, plus its probe's MACs
    recipe = tune(tiny_model(), 0.3, tmp_path, configs=["ddim-6+fbcache:threshold=0", "ddim-6"], **FAST)
    q = recipe["quality"]
    assert q["decision"] == "tie"
    assert q["interval"]["lo"] <= 0 <= q["interval"]["hi"]
    assert recipe["config"] == "ddim-6"  # the cheaper
    assert "tied" in (tmp_path / "report.md").read_text()


def test_a_clear_difference_is_a_winner_even_when_it_costs_more(tmp_path):
    recipe = tune(tiny_model(), 0.3, tmp_path, configs=["ddim-2", "dpm++2m-12"], **FAST)
    assert recipe["quality"]["decision"] == "winner"
    assert recipe["config"] == "dpm++2m-12"
    assert recipe["quality"]["interval"]["lo"] > 0


def test_a_recipe_refuses_another_model_and_builds_its_policy(tmp_path):
    model = tiny_model()
    tune(model, 0.3, tmp_path, configs=["ddim-20+teacache:target=0.31"], **FAST)
    recipe = load_recipe(tmp_path)
    assert (recipe.sampler, recipe.steps, recipe.cfg_scale) == ("ddim", 20, 1.5)
    policy = recipe.policy(model)
    assert type(policy).__name__ == "TeaCache" and policy.threshold == recipe.threshold
    assert policy.coefficients is not None  # what calibration fitted came back
    with pytest.raises(UsageError, match=recipe.fingerprint) as e:
        recipe.policy(tiny_model(seed=1))
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no recipe.json"):
        load_recipe(tmp_path / "rows")


def test_cli_tune_then_sample_with_the_recipe(tmp_path, capsys):
    from lazydit.cli import main
    from lazydit.models.checkpoint import save_model

    f = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), f)
    out = tmp_path / "run"
    main(["tune", "--model", str(f), "--budget", "0.3", "--num-samples", "8", "--first", "4", "--fine", "ddim-20",
          "--out", str(out), "--json", "--device", "cpu", "--gate-iters", "4"])
    row = json.loads(capsys.readouterr().out)[0]
    recipe = load_recipe(out)
    assert row["config"] == recipe.config
    png = tmp_path / "s.png"
    main(["sample", "--model", str(f), "--recipe", str(out), "--out", str(png), "--per-class", "1", "--json",
          "--device", "cpu"])
    sampled = json.loads(capsys.readouterr().out)[0]
    assert png.is_file() and sampled["steps"] == recipe.steps
    assert abs(sampled["tmacs"] - recipe.doc["tmacs"]) < 0.2 * recipe.doc["tmacs"]
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(f), "--recipe", str(out), "--steps", "10", "--out", str(png)])
    assert "drop --steps" in str(e.value)
    other = tmp_path / "other.safetensors"
    save_model(tiny_model(seed=1), other)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(other), "--recipe", str(out), "--out", str(png)])
    assert recipe.fingerprint in str(e.value)


@pytest.mark.parametrize("argv, code, text", [
    (["--budget", "0"], 2, "(0, 1]"), (["--budget", "1.5"], 2, "(0, 1]"),
    (["--budget", "-1", "--budget-kind", "seconds"], 2, "seconds per image must be > 0"),
    (["--budget", "nan", "--budget-kind", "seconds"], 2, "seconds per image must be > 0")])
def test_cli_tune_refuses_bad_budgets(tmp_path, capsys, argv, code, text):
    from lazydit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tune", *argv, "--out", str(tmp_path / "run")])
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert text in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_cli_tune_refuses_a_file_as_out(tmp_path):
    from lazydit.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["tune", "--budget", "0.3", "--out", str(f)])
    assert "is a file" in str(e.value)


def test_enable_lazy_takes_a_recipe_on_a_diffusers_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    import torch
    from diffusers import DDIMScheduler, DiTPipeline

    from lazydit.diffusers import disable_lazy, enable_lazy
    from lazydit.loading import load_model

    from test_diffusers import ddim, tiny_transformer, tiny_vae

    folder = tmp_path / "pipe"
    DiTPipeline(transformer=tiny_transformer(), vae=tiny_vae(), scheduler=ddim()).save_pretrained(folder)
    tune(load_model(str(folder)), 0.3, tmp_path / "run", configs=["ddim-6+fora:interval=2"], **FAST)
    recipe = load_recipe(tmp_path / "run")
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    handle = enable_lazy(pipe, recipe)
    images = pipe(class_labels=[1, 2], num_inference_steps=recipe.steps, guidance_scale=recipe.cfg_scale,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape[0] == 2 and handle.stats().lazy_ratio > 0
    disable_lazy(pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    with pytest.raises(UsageError, match="leading"):
        enable_lazy(pipe, recipe)
    other = DiTPipeline(transformer=tiny_transformer(seed=1), vae=tiny_vae(), scheduler=ddim())
    with pytest.raises(UsageError, match=recipe.fingerprint):
        enable_lazy(other, recipe)


SECONDS_CONFIGS = ["ddim-4", "ddim-12", "ddim-12+fora:interval=3"]


def test_a_seconds_budget_times_every_candidate_and_scores_only_those_within_it(tmp_path):
    model = tiny_model()
    wide = tune(model, 100.0, tmp_path / "wide", budget_kind="seconds", configs=SECONDS_CONFIGS, timing_repeats=2,
                **FAST)
    timing = json.loads((tmp_path / "wide" / "rows" / "timing.json").read_text())
    assert set(timing["rows"]) == {"ddim-10", *SECONDS_CONFIGS}  # the probe and every candidate
    assert all(len(r["times"]) == 2 and r["seconds_per_image"] > 0 for r in timing["rows"].values())
    assert wide["budget"]["kind"] == "seconds" and wide["budget"]["seconds_per_mac"] > 0
    assert wide["budget"]["batch_size"] == 16 and wide["budget"]["share"] is None
    assert wide["seconds_per_image"] == timing["rows"][wide["config"]]["seconds_per_image"]
    # a budget between the timed figures, from the same timings (rows/timing.json is resumed): only those within
    times = {c: timing["rows"][c]["seconds_per_image"] for c in SECONDS_CONFIGS}
    cut = sorted(times.values())[1]
    (tmp_path / "cut" / "rows").mkdir(parents=True)
    (tmp_path / "cut" / "rows" / "timing.json").write_text(json.dumps(timing))
    recipe = tune(model, cut, tmp_path / "cut", budget_kind="seconds", configs=SECONDS_CONFIGS, timing_repeats=2,
                  **FAST)
    scored = {r["config"] for r in rows_of(tmp_path / "cut")}
    assert scored == {c for c, t in times.items() if t <= cut}
    assert {d["what"] for d in recipe["not_tried"]} >= {c for c, t in times.items() if t > cut}
    assert times[recipe["config"]] <= cut
    assert (tmp_path / "cut" / "frontier_seconds.png").is_file()
    assert "s per image" in (tmp_path / "cut" / "report.md").read_text()
    with pytest.raises(UsageError, match="no candidate was scored"):
        tune(model, 1e-9, tmp_path / "none", budget_kind="seconds", configs=SECONDS_CONFIGS, timing_repeats=1, **FAST)


class PoolExtractor(torch.nn.Module):
    """A fixed random projection of 2x2-pooled images: a feature extractor for tiny 8x8 models."""

    def __init__(self, seed=0):
        super().__init__()
        self.proj = torch.nn.Linear(16, 6)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def preprocess(images):
        from lazydit.evaluation.features import images_to_tensor

        return images_to_tensor(images)

    def features(self, x):
        pool = self.proj(torch.nn.functional.avg_pool2d(x, 2).flatten(1))
        return dict(pool=pool, spatial=pool, logits=pool)


def test_fid_to_data_ranks_the_finalists_beside_the_distance_to_the_fine_sampler(tmp_path):
    import numpy as np

    from lazydit.evaluation.features import reference_stats

    model, ext = tiny_model(), PoolExtractor()
    real = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    ref = reference_stats(ext, real, progress=False)
    ref["meta"] = {"fingerprint": __import__("lazydit.files", fromlist=["x"]).weights_fingerprint(ext)}
    recipe = tune(model, 0.3, tmp_path, configs=["ddim-3", "ddim-8", "dpm++2m-8"], extractor=ext, ref=ref, **FAST)
    recs = [r for r in rows_of(tmp_path) if "mse_to_fine" in r]
    assert recs and all(r["fid_to_ref"] >= 0 and r["fid_to_fine"] >= 0 for r in recs)
    rk = recipe["rankings"]
    assert sorted(rk["by_fine"]) == sorted(rk["by_ref"]) and len(rk["by_fine"]) >= 2
    fids = [rk["fid_to_ref"][c] for c in rk["by_ref"]]
    assert fids == sorted(fids)
    assert rk["same_best"] == (rk["by_fine"][0] == rk["by_ref"][0]) and -1 <= rk["kendall_tau"] <= 1
    assert "Two rankings" in (tmp_path / "report.md").read_text()
    with pytest.raises(UsageError, match="another feature extractor"):
        tune(model, 0.3, tmp_path / "other", configs=["ddim-3"], extractor=PoolExtractor(seed=1), ref=ref, **FAST)
    with pytest.raises(UsageError, match="needs a feature extractor"):
        tune(model, 0.3, tmp_path / "none", configs=["ddim-3"], extractor=None, ref=ref, **FAST)


def test_tune_on_a_pixart_folder_with_captions_and_enable_lazy_with_the_recipe(tmp_path):
    pytest.importorskip("transformers")
    import numpy as np
    from diffusers import PixArtAlphaPipeline
    from safetensors.torch import save_file

    from lazydit.diffusers import disable_lazy, enable_lazy
    from lazydit.loading import load_model

    from test_diffusers import ddim, tiny_pixart, tiny_vae

    tr = tiny_pixart()
    tr.save_pretrained(tmp_path / "pixart" / "transformer")
    embeds, negative = torch.randn(4, 5, 24), torch.zeros(5, 24)
    save_file({"embeds": embeds, "negative": negative}, tmp_path / "caps.safetensors")
    model = load_model(str(tmp_path / "pixart"), captions=str(tmp_path / "caps.safetensors"))
    recipe = tune(model, 0.3, tmp_path / "run", configs=["ddim-12+fora:interval=2", "ddim-12+fora:interval=3"],
                  **{**FAST, "fine": "ddim-16"})
    assert (tmp_path / "run" / "recipe.json").is_file() and recipe["model"]["fingerprint"]
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tr, scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    loaded = load_recipe(tmp_path / "run")
    handle = enable_lazy(pipe, loaded)
    try:
        out = pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds[:2], prompt_attention_mask=torch.ones(2, 5),
                   negative_prompt_embeds=negative[None].expand(2, -1, -1),
                   negative_prompt_attention_mask=torch.ones(2, 5), num_inference_steps=loaded.steps,
                   guidance_scale=loaded.cfg_scale, height=16, width=16, use_resolution_binning=False,
                   output_type="np").images
        assert np.isfinite(out).all() and out.shape[0] == 2 and handle.stats().lazy_ratio > 0
    finally:
        disable_lazy(pipe)
