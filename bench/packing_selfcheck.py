"""The packing self-check's relative error (``coin.modeling.backbone.packing_error``) on the device at hand.

``coin train`` refuses ``train.packing`` where the error exceeds ``packing_tolerance`` of the weights' dtype
(``packing_check``). This prints, for a TinyLlama-1.1B-shaped Llama (random weights, LoRA as ``train.lora``
defaults) in bfloat16 and in float32 (or ``--shape smoke``: 2 layers), the error with the real block-diagonal mask
and with a mask that lets the packed sequences see each other (what the check exists to catch), against the
tolerance::

    python bench/packing_selfcheck.py [--shape smoke] [--device cuda]

Needs torch, transformers and peft only (as bench/gpu_check.py, whose model builder it uses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (puts src/ on the path)

import coin.modeling.backbone as backbone  # noqa: E402
from coin.modeling.lora import apply_lora  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["1b", "smoke"], default="1b")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = backbone.pick_device(args.device)
    shape = gpu_check.TINYLLAMA_1B if args.shape == "1b" else gpu_check.SMOKE_1B
    tok = gpu_check.WordHashTokenizer(shape["vocab_size"])
    real = backbone.packed_attention_mask
    leaky = lambda s, m, d: torch.ones(s.size(1), s.size(1), dtype=torch.bool, device=s.device).tril()[None, None]  # noqa: E731
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}; shape {args.shape}")
    for dtype in (torch.bfloat16, torch.float32):
        model = apply_lora(gpu_check.build_llama(shape, tok, device, dtype, 0), gpu_check.StepSettings().lora)
        for name, mask in (("block-diagonal mask", real), ("leaky mask (sequences mixed)", leaky)):
            backbone.packed_attention_mask = mask
            try:
                err, tol = backbone.packing_check(model)
            finally:
                backbone.packed_attention_mask = real
            print(f"{str(dtype).removeprefix('torch.'):9s} {name:30s} relative error {err:.3e}  tolerance {tol:g}  "
                  f"{'passes' if err <= tol else 'refused'}")
        del model
        gpu_check._free()


if __name__ == "__main__":
    main()
