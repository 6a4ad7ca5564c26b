"""The embedded default's training curves (docs/images/embedded_training.png) from a build_embedded.sh run folder.

    python scripts/embedded_curves.py [RUN_DIR]     # default runs/embedded
"""

import json
import sys
from pathlib import Path

from lazydit.plots import loss_curves

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/embedded")
ae = json.loads((run / "autoencoder" / "log.json").read_text())  # (step, mse, kl)
dit = json.loads((run / "pretrain" / "log.json").read_text())  # (step, loss)
loss_curves([("autoencoder: reconstruction MSE per pixel", [r[0] for r in ae], [r[1] for r in ae]),
             ("latent DiT: eps-MSE", [r[0] for r in dit], [r[1] for r in dit])],
            Path("docs/images/embedded_training.png"),
            title="Training the embedded default on the 2-core CPU (scripts/build_embedded.sh)")
print("wrote docs/images/embedded_training.png")
