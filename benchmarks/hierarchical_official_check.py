"""Hand check of revcol_vit.hierarchical against the official RevCol model code on random weights (not in CI).

The official models/ folder (megvii-research/RevCol: models/revcol.py, modules.py, revcol_function.py,
revcol_huge.py) must sit in $OFFICIAL/models, default /tmp/revcol_official/models:

    OFFICIAL=/tmp/revcol_official PYTHONPATH=. python benchmarks/hierarchical_official_check.py 224 [variant ...]
"""
import os
import sys

import timm
import torch

import revcol_vit  # noqa: F401  (registers the models)
from revcol_vit.hierarchical import checkpoint_filter_fn

sys.path.insert(0, os.environ.get("OFFICIAL", "/tmp/revcol_official"))
from models import revcol as official  # noqa: E402

torch.manual_seed(0)
size = int(sys.argv[1]) if len(sys.argv) > 1 else 64
for name in sys.argv[2:] or ["revcol_tiny", "revcol_small", "revcol_base", "revcol_large", "revcol_xlarge"]:
    for inter in (True, False):
        ref = getattr(official, name)(save_memory=False, inter_supv=inter).eval()
        with torch.no_grad():
            for n, p in ref.named_parameters():  # random weights everywhere, scales away from their inits
                if "alpha" in n:
                    p.copy_(torch.empty_like(p).uniform_(0.3, 1.2) * torch.sign(torch.randn_like(p)))
                elif n.endswith("gamma"):
                    p.copy_(torch.empty_like(p).uniform_(0.1, 1.0))
                else:
                    p.add_(torch.randn_like(p) * 0.02)
        ours = timm.create_model(name, intermediate_supervision=inter).eval()
        for fmt in ("model", "state_dict_ema", "raw"):
            sd = ref.state_dict() if fmt == "raw" else {fmt: ref.state_dict()}
            ours.load_state_dict(checkpoint_filter_fn(sd, ours), strict=True)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            cls, img = ref(x)
            want = cls[-1]
            got = ours(x)
            err = ((got - want).abs().max() / want.abs().max()).item()
            line = f"{name} inter_supv={inter} {size}px logits max rel diff {err:.2e}"
            if inter:
                logits, recon = ours.forward_supervised(x)
                e2 = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(logits + recon, cls + img))
                line += f", all heads and decoders {e2:.2e}"
        print(line, flush=True)
