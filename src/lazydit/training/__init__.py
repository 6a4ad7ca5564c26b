"""Training on a frozen or a fresh model: LazyDiT gates (`gates`, the 3-pass recipe) and the embedded default's
base model (`pretrain`) and autoencoder (`autoencoder`); `resume` holds the --resume check all of them share."""

from lazydit.training.gates import GateTrainConfig, train_gates

__all__ = ["GateTrainConfig", "train_gates"]
