"""Evaluation: metric formulas (`metrics`), feature extractors (`inception`, the Fashion-MNIST classifier
`fmnist`), feature statistics and scores (`features`), the one-configuration driver (`driver`) and the row records that let a table be sampled in parts
(`records`). The paper's MAC accounting is `lazydit.models.cost`."""


def __getattr__(name):  # `lazydit.evaluation.evaluate_config` without importing the driver with the package
    if name in ("EvalConfig", "evaluate_config", "generate", "score"):
        from lazydit.evaluation import driver

        return getattr(driver, name)
    raise AttributeError(name)
