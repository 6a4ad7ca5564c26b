"""lazydit on diffusers models and pipelines (tiny random DiT and PixArt transformers, CPU)."""

import json

import numpy as np
import pytest
import torch

from lazydit.errors import GateMismatchError
from lazydit.lazy import ForcedPlan, LazyConfig, LazyGates, apply_lazy, make_policy, policy_for
from lazydit.pipeline import sample

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,  # noqa: E402
                       DPMSolverMultistepScheduler)

from lazydit.diffusers import (DiffusersDiT, disable_lazy, enable_lazy, from_diffusers,  # noqa: E402
                               make_reference_exact, schedule_name, scheduler_timesteps, to_diffusers)

from conftest import tiny_model  # noqa: E402

STEPS = 6


def tiny_transformer(seed=0, num_classes=1000):
    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                               sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return tr


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def tiny_pixart(perturb=True):
    """A tiny random PixArt transformer (cross-attention to 24-wide captions); perturbed: no zero-initialised layer."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                  caption_channels=24, num_embeds_ada_norm=1000)
    if perturb:
        tr.eval()
        with torch.no_grad():
            for p in tr.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return tr


def ddim(spacing="linspace"):
    return DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                         timestep_spacing=spacing)


@pytest.fixture(scope="module")
def pipe():
    p = DiTPipeline(transformer=tiny_transformer(), vae=tiny_vae(), scheduler=ddim())
    p.set_progress_bar_config(disable=True)
    return p


def images(pipe, labels=(1, 2, 3), steps=STEPS):
    return pipe(class_labels=list(labels), guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                num_inference_steps=steps, output_type="np").images


# ---------------------------------------------------------------- converters


def test_converters_reference_exact_and_stock():
    dit = tiny_model(num_classes=4, class_dropout_prob=0.1, learn_sigma=True, in_channels=4)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([999, 400, 0]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        ref = dit(x, t, y)
        exact = to_diffusers(dit, reference_exact=True)
        assert torch.equal(exact(x, timestep=t, class_labels=y).sample, ref)
        stock = to_diffusers(dit)
        rel = float((stock(x, timestep=t, class_labels=y).sample - ref).norm() / ref.norm())
        assert 1e-3 < rel < 0.2  # the documented difference: timestep frequencies and FFN LayerNorm eps
        back = from_diffusers(exact)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), dit.state_dict().values()))
        assert torch.equal(back(x, t, y), ref)
        # a saved exact transformer keeps norm_eps 1e-6 in its config; the timestep patch is reapplied
        assert exact.config.norm_eps == 1e-6
        exact.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift = 1
        assert not torch.equal(exact(x, timestep=t, class_labels=y).sample, ref)
        make_reference_exact(exact)
        assert torch.equal(exact(x, timestep=t, class_labels=y).sample, ref)


def test_wrapped_transformer_runs_lazydit_tools():
    tr = tiny_transformer(num_classes=10)
    model = DiffusersDiT(tr)
    assert model.config.hidden_size == 32 and model.config.learn_sigma and model.config.num_classes == 10
    y = torch.tensor([0, 1, 2, 3])
    bare, rep = sample(model, y, STEPS, cfg_scale=2.0, progress=False)
    assert rep.tmacs > 0
    gates = LazyGates.for_model(model, STEPS)
    x, rep = sample(model, y, STEPS, policy=policy_for(gates, LazyConfig(threshold=0.0)), cfg_scale=2.0, progress=False)
    assert torch.equal(x, bare) and rep.lazy_ratio == 0.0
    _, rep = sample(model, y, STEPS, policy=policy_for(gates, LazyConfig(threshold=1.0)), cfg_scale=2.0, progress=False)
    assert rep.lazy_ratio == 0.5
    for spec in ("fora:interval=2", "taylorseer:interval=2,order=1,warmup=1", "fbcache:threshold=10",
                 "teacache:threshold=10,coefficients=1/0"):
        x, rep = sample(model, y, STEPS, policy=make_policy(spec, STEPS), cfg_scale=2.0, progress=False)
        assert torch.isfinite(x).all() and 0 < rep.lazy_ratio < 1, spec


def test_forced_skip_reuses_the_previous_output_exactly():
    model = DiffusersDiT(tiny_transformer(num_classes=10))
    plan = torch.zeros(STEPS, 2, 2, dtype=torch.bool)
    plan[2, 1, 0] = True  # step k=2: block 1's self-attention skips
    seen = {}
    attn = model.blocks[1].attn1
    handle = apply_lazy(model, ForcedPlan(plan, parity=False))
    hook = attn.register_forward_hook(lambda m, a, out: seen.setdefault(len(seen), out.clone()))
    try:
        from lazydit.sampling import ddim_sample

        ddim_sample(model, torch.tensor([0, 1]), STEPS, cfg_scale=2.0, progress=False)
    finally:
        hook.remove()
        handle.remove()
    order = list(range(STEPS - 1, -1, -1))  # k of each call
    i = order.index(2)
    assert torch.equal(seen[i], seen[i - 1])  # exactly the output of step k=3
    assert not torch.equal(seen[i + 1], seen[i])
    assert handle.stats().skipped[2, 1, 0] == 4 and int(handle.stats().skipped.sum()) == 4


def test_mixed_batch_equals_rows_alone():
    """Per-row decisions: each row of a batch decides and computes as it would alone (float rounding of batched
    attention aside)."""
    from lazydit.sampling import ddim_sample

    model = DiffusersDiT(tiny_transformer(num_classes=10))
    gates = LazyGates.for_model(model, STEPS)
    torch.manual_seed(1)
    gates.weight.data.normal_(0, 0.05)
    lazy = LazyConfig(threshold=0.5, record_decisions=True)
    y = torch.tensor([0, 1, 2])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(rows):
        with apply_lazy(model, gates, lazy) as h:
            out = ddim_sample(model, y[rows], STEPS, x=x[rows], progress=False)
            return out, h.decisions.clone(), h.stats().lazy_ratio

    out, decisions, ratio = run(slice(None))
    assert 0 < ratio < 0.5 and not (decisions.all(-1) | (~decisions).all(-1)).all()  # rows differ somewhere
    for i in range(3):
        one, dec, _ = run(slice(i, i + 1))
        assert torch.equal(dec[..., 0], decisions[..., i])
        torch.testing.assert_close(one, out[i : i + 1], rtol=0, atol=2e-4)


# ---------------------------------------------------------------- pipelines


def test_pipeline_all_compute_gates_are_bit_identical_and_state_resets(pipe):
    ref = images(pipe)
    gates = LazyGates.for_model(pipe.transformer, STEPS)
    assert gates.timesteps == scheduler_timesteps(pipe.scheduler, STEPS)  # lazydit respacing = DDIM "linspace"
    handle = enable_lazy(pipe, gates, LazyConfig(threshold=0.0))
    try:
        assert np.array_equal(images(pipe), ref) and handle.stats().lazy_ratio == 0.0
    finally:
        disable_lazy(pipe)
    handle = enable_lazy(pipe, gates, LazyConfig(threshold=1.0))
    try:
        first = images(pipe)
        stats = handle.stats()
        handle.reset_stats()
        again = images(pipe)  # a second call starts from a clean state
        assert np.array_equal(first, again) and torch.equal(handle.stats().skipped, stats.skipped)
        assert not np.array_equal(first, ref) and stats.lazy_ratio == 0.5  # every module of k = 4, 2, 0 skips
    finally:
        disable_lazy(pipe)
    assert np.array_equal(images(pipe), ref)  # disabled: the bare pipeline again


@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_every_scheduler_and_spacing(pipe, cls, spacing):
    old = pipe.scheduler
    pipe.scheduler = cls.from_config(ddim().config, timestep_spacing=spacing)
    try:
        ref = images(pipe)
        ts = scheduler_timesteps(pipe.scheduler, STEPS)
        gates = LazyGates.for_model(pipe.transformer, STEPS, timestep_map=ts,
                                    schedule=schedule_name(pipe.scheduler, STEPS))
        for th, want in ((0.0, 0.0), (1.0, 0.5)):
            handle = enable_lazy(pipe, gates, LazyConfig(threshold=th))
            try:
                out = images(pipe)
                assert handle.stats().lazy_ratio == pytest.approx(want)
                assert np.array_equal(out, ref) == (th == 0.0)
            finally:
                disable_lazy(pipe)
    finally:
        pipe.scheduler = old


def test_schedule_mismatch_names_both_schedules(pipe):
    gates = LazyGates.for_model(pipe.transformer, STEPS)  # lazydit's respacing (DDIM "linspace")
    old = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(ddim().config, timestep_spacing="leading")
    enable_lazy(pipe, gates)
    try:
        with pytest.raises(GateMismatchError) as e:
            images(pipe)
        msg = str(e.value)
        assert "DDIMScheduler, timestep_spacing='leading', 6 steps" in msg and "T=6" in msg and "linspace" in msg
        with pytest.raises(GateMismatchError, match="'leading', 4 steps"):
            images(pipe, steps=4)
    finally:
        disable_lazy(pipe)
        pipe.scheduler = old


def test_gate_folder_round_trip(tmp_path, pipe):
    gates = LazyGates.for_model(pipe.transformer, STEPS)
    gates.weight.data.normal_()
    gates.save_pretrained(tmp_path / "g")
    assert {p.name for p in (tmp_path / "g").iterdir()} == {"gates.safetensors", "config.json"}
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["steps"] == STEPS and cfg["branch_kinds"] == ["attn", "mlp"] and cfg["shape"] == [2, 2, STEPS, 32]
    back = LazyGates.load(tmp_path / "g")
    assert torch.equal(back.weight, gates.weight) and back.timesteps == gates.timesteps
    cfg["threshold"] = 0.9
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GateMismatchError, match="disagree on threshold"):
        LazyGates.load(tmp_path / "g")


def test_gates_for_other_blocks_are_refused(pipe):
    dit_gates = LazyGates.for_model(tiny_model(hidden_size=32, depth=2), STEPS)
    dit_gates.meta["model_config"] = {}
    # same depth and width, but lazydit's DiT: the stored branch kinds agree, the config is checked where it can be
    enable_lazy(pipe, dit_gates)
    disable_lazy(pipe)
    three = LazyGates(2, 32, STEPS, num_branches=3, meta={"branch_kinds": ["attn", "cross", "mlp"]})
    with pytest.raises(GateMismatchError, match="branches"):
        enable_lazy(pipe, three)


# ---------------------------------------------------------------- PixArt (text-conditional, cross-attention)


def test_pixart_pipeline():
    pytest.importorskip("transformers")
    from diffusers import PixArtAlphaPipeline

    tr = tiny_pixart()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tr, scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    emb, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.long)

    def run():
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask,
                    negative_prompt_embeds=torch.zeros(2, 5, 24), negative_prompt_attention_mask=mask,
                    num_inference_steps=STEPS, guidance_scale=3.0, height=16, width=16, use_resolution_binning=False,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    ref = run()
    gates = LazyGates.for_model(tr, STEPS)
    assert gates.weight.shape == (2, 3, STEPS, 32) and gates.meta["branch_kinds"] == ["attn", "cross", "mlp"]
    handle = enable_lazy(pipe, gates, LazyConfig(threshold=0.0))
    try:
        assert np.array_equal(run(), ref)
    finally:
        disable_lazy(pipe)
    handle = enable_lazy(pipe, gates, LazyConfig(threshold=1.0))
    try:
        run()
        assert handle.stats().ratio(2).tolist() == [0.5] * 3  # attn, cross, mlp alike
    finally:
        disable_lazy(pipe)
    only_mlp = enable_lazy(pipe, gates, LazyConfig(threshold=1.0, skippable_kinds=("mlp",)))
    try:
        run()
        assert only_mlp.stats().ratio(2).tolist() == [0.0, 0.0, 0.5]
        # the report names each of the three branches by its kind: the FFN is "mlp", cross-attention "cross"
        assert only_mlp.stats().as_dict()["per_branch"] == {"attn": 0.0, "cross": 0.0, "mlp": 0.5}
    finally:
        disable_lazy(pipe)
    for spec in ("fora:interval=2", "teacache:threshold=10,coefficients=1/0"):
        handle = enable_lazy(pipe, make_policy(spec, STEPS))
        try:
            assert np.isfinite(run()).all() and handle.stats().lazy_ratio > 0
        finally:
            disable_lazy(pipe)


# ---------------------------------------------------------------- train-gates on a diffusers folder


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "tiny-dit"
    p = DiTPipeline(transformer=tiny_transformer(), vae=tiny_vae(), scheduler=ddim())
    p.save_pretrained(folder)
    return folder


def test_load_model_reads_diffusers_folders(pipe_folder):
    from lazydit.loading import load_model

    for spec in (pipe_folder, pipe_folder / "transformer",
                 pipe_folder / "transformer" / "diffusion_pytorch_model.safetensors"):
        model = load_model(str(spec))
        assert isinstance(model, DiffusersDiT) and model.config.depth == 2


def test_cli_train_gates_on_a_pipeline_folder(pipe_folder, tmp_path, capsys):
    from lazydit.cli import main
    from lazydit.loading import load_model

    model = load_model(str(pipe_folder))
    y = torch.arange(8) % 5
    ratios = []
    for rho in ("0", "1e-2"):
        out = tmp_path / f"g{rho}"
        main(["train-gates", "--model", str(pipe_folder), "--steps", "6", "--data-free", "--pool", "16",
              "--iters", "20", "--batch-size", "8", "--lr", "1e-2", "--rho", rho, "--out", str(out), "--json"])
        res = json.loads(capsys.readouterr().out)
        gates = LazyGates.load(res["gates"])
        _, rep = sample(model, y, 6, policy=policy_for(gates), cfg_scale=1.5, progress=False)
        ratios.append(rep.lazy_ratio)
    assert ratios[0] < ratios[1], ratios
    # for the DPM-Solver++ schedule of the pipeline's scheduler config
    dpm = DPMSolverMultistepScheduler.from_config(ddim().config)
    dpm.save_pretrained(tmp_path / "dpm")
    main(["train-gates", "--model", str(pipe_folder), "--steps", "6", "--data-free", "--pool", "8", "--iters", "2",
          "--batch-size", "4", "--scheduler", str(tmp_path / "dpm"), "--out", str(tmp_path / "gd"), "--json"])
    gates = LazyGates.load(json.loads(capsys.readouterr().out)["gates"])
    assert gates.timesteps == scheduler_timesteps(dpm, 6)
    assert gates.schedule_name() == "DPMSolverMultistepScheduler, timestep_spacing='linspace', 6 steps"


def test_readme_diffusers_quick_start_runs_as_written(pipe_folder, tmp_path, monkeypatch):
    """The README's diffusers block, with PIPELINE a tiny random pipeline folder, STEPS 6 and ITERS 2."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## diffusers models and pipelines.*?```python\n(.*?)```", readme, re.S)[1]
    monkeypatch.chdir(tmp_path)
    ns = {"PIPELINE": str(pipe_folder), "STEPS": 6, "ITERS": 2}
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["lazy"].stats().lazy_ratio > 0 and len(ns["images"]) == 2
    assert LazyGates.load(tmp_path / "dit-gates").timesteps == scheduler_timesteps(ns["pipe"].scheduler, 6)


def test_diffusers_hooks_experiment_small(tmp_path, monkeypatch):
    """The docs' comparison script, on a 2-block pipeline and 6 steps: rows run or say why; lazydit's first-block
    cache equals cache-dit's (when installed) at the same threshold."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "diffusers_hooks.py"
    spec = importlib.util.spec_from_file_location("diffusers_hooks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    small = mod.tiny_pipeline
    monkeypatch.setattr(mod, "tiny_pipeline", lambda layers=2: small(2))
    monkeypatch.setattr(mod, "STEPS", 6)
    rows = {r["row"]: r for r in mod.main(["--docs", str(tmp_path)])}
    assert rows["bare pipeline"]["skipped"] == 0.0
    assert rows["lazydit fora:interval=2"]["skipped"] == pytest.approx(2 / 6)  # k = 5, 4, 2, 0 compute
    md = (tmp_path / "diffusers_hooks.md").read_text()  # one table line per row, under the header
    assert all(f"| {name} |" in md for name in rows) and "| lazydit fora:interval=2 | 33.3% |" in md
    cd = [r for name, r in rows.items() if name.startswith("cache-dit FBCache")]
    if cd and "error" not in cd[0]:
        assert all(r["max_diff_to_lazydit"] == 0.0 for r in cd)


def test_pixart_gates_train_on_captions_and_attach_to_the_pipeline(tmp_path):
    """Text-conditional: caption embeddings as labels (the negative prompt as the null label), data-free training;
    the gates fit the pipeline's transformer, and a larger penalty skips more."""
    pytest.importorskip("transformers")
    from diffusers import PixArtAlphaPipeline

    from lazydit.diffusers import CaptionBank, DiffusersPixArt
    from lazydit.training import GateTrainConfig, train_gates
    from lazydit.training.trajectories import trajectory_data

    tr = tiny_pixart()
    captions = CaptionBank(torch.randn(4, 5, 24), negative=torch.zeros(5, 24))
    model = DiffusersPixArt(tr, captions)
    assert model.config.num_classes == 4 and model.guided_channels == 4
    y = torch.arange(4)
    ratios = []
    for rho in (0.0, 1e-2):
        data, _ = trajectory_data(model, STEPS, 8, size=16, cfg_scale=3.0, progress=False)
        cfg = GateTrainConfig(steps=STEPS, iters=20, batch_size=8, lr=1e-2, rho_attn=rho, rho_mlp=rho,
                              data_free=True)
        gates = train_gates(model, data, cfg, progress=False)
        _, rep = sample(model, y, STEPS, policy=policy_for(gates), cfg_scale=3.0, progress=False)
        ratios.append(rep.lazy_ratio)
    assert gates.meta["branch_kinds"] == ["attn", "cross", "mlp"] and ratios[0] < ratios[1], ratios
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tr, scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    handle = enable_lazy(pipe, gates)
    try:
        out = pipe(prompt=None, negative_prompt=None, prompt_embeds=captions.embeds[:2],
                   prompt_attention_mask=captions.mask[:2], negative_prompt_embeds=captions.embeds[-1:].expand(2, -1, -1),
                   negative_prompt_attention_mask=captions.mask[-1:].expand(2, -1), num_inference_steps=STEPS,
                   guidance_scale=3.0, height=16, width=16, use_resolution_binning=False, output_type="np").images
        assert np.isfinite(out).all() and handle.stats().lazy_ratio > 0
    finally:
        disable_lazy(pipe)


def test_lookahead_gates_and_heat_maps_on_diffusers_blocks(tmp_path):
    """Look-ahead gates plan before the step on diffusers' blocks too (without the norm/modulation saving); the heat
    map draws one panel per branch (three for PixArt's blocks)."""
    from lazydit.plots import laziness_heatmap

    model = DiffusersDiT(tiny_transformer(num_classes=10))
    y = torch.arange(4)
    ref, _ = sample(model, y, STEPS, cfg_scale=2.0, progress=False)
    gates = LazyGates.for_model(model, STEPS, lookahead=True)
    out, rep = sample(model, y, STEPS, policy=policy_for(gates, LazyConfig(threshold=0.0)), cfg_scale=2.0, progress=False)
    assert torch.equal(out, ref) and rep.lazy_ratio == 0.0
    _, rep = sample(model, y, STEPS, policy=policy_for(gates, LazyConfig(threshold=1.0)), cfg_scale=2.0, progress=False)
    assert rep.lazy_ratio == 0.5
    laziness_heatmap(rep.stats["per_step_layer_branch"], tmp_path / "h2.png")
    laziness_heatmap(np.random.rand(STEPS, 2, 3), tmp_path / "h3.png", kinds=("attn", "cross", "mlp"))
    assert (tmp_path / "h2.png").stat().st_size > 5000 and (tmp_path / "h3.png").stat().st_size > 5000


def test_cli_train_gates_on_a_pixart_folder_with_captions(tmp_path, capsys):
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from lazydit.cli import main

    tr = tiny_pixart(perturb=False)
    tr.save_pretrained(tmp_path / "pixart" / "transformer")
    save_file({"embeds": torch.randn(3, 5, 24), "negative": torch.zeros(5, 24)}, tmp_path / "caps.safetensors")
    main(["train-gates", "--model", str(tmp_path / "pixart"), "--captions", str(tmp_path / "caps.safetensors"),
          "--steps", "6", "--data-free", "--pool", "6", "--iters", "2", "--batch-size", "3", "--out",
          str(tmp_path / "g"), "--json"])
    gates = LazyGates.load(json.loads(capsys.readouterr().out)["gates"])
    assert gates.weight.shape == (2, 3, 6, 32)
    with pytest.raises(SystemExit) as e:  # a text-conditional model without its captions: one line
        main(["train-gates", "--model", str(tmp_path / "pixart"), "--steps", "6", "--data-free", "--out",
              str(tmp_path / "h")])
    assert "pass --captions FILE" in str(e.value.code) and not (tmp_path / "h").exists()


def test_load_scheduler_reads_a_pipeline_or_a_scheduler_folder(pipe_folder, tmp_path):
    from lazydit.diffusers import load_scheduler
    from lazydit.errors import LazyditError

    from_pipe = load_scheduler(pipe_folder)  # the pipeline folder: its scheduler/
    assert isinstance(from_pipe, DDIMScheduler) and scheduler_timesteps(from_pipe, 6) == scheduler_timesteps(ddim(), 6)
    DPMSolverMultistepScheduler.from_config(ddim("leading").config).save_pretrained(tmp_path / "dpm")
    dpm = load_scheduler(str(tmp_path / "dpm"))  # a scheduler folder
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert schedule_name(dpm, 6) == "DPMSolverMultistepScheduler, timestep_spacing='leading', 6 steps"
    with pytest.raises(LazyditError, match=rf"^{tmp_path}: no scheduler_config.json"):
        load_scheduler(tmp_path)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "scheduler_config.json").write_text('{"_class_name": "NoSuchScheduler"}')
    with pytest.raises(LazyditError, match="unknown diffusers scheduler 'NoSuchScheduler'"):
        load_scheduler(tmp_path / "odd")
