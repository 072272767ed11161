"""Split a state dict into files of at most ``--max-mb`` each, and join them back: moves trained weights through the
device tool, which returns at most 16 MB per file and carries at most 64 MiB in all.

    .venv/bin/python bench/weight_parts.py split runs/dct_quality/g9a_unconditional.pt OUTDIR [--bf16]
    .venv/bin/python bench/weight_parts.py join OUTDIR runs/dct_quality/g9a_unconditional.pt

``--bf16`` halves the size (a continued run starts from weights rounded to bf16; they are stored float32 again
on join). Parts are named <stem>.partNN.pt and joined in name order; a key found in two parts is an error.
"""

from __future__ import annotations

import argparse
import glob
import os

import torch


def split(state_path: str, out_dir: str, max_mb: float, bf16: bool) -> list[str]:
    state = torch.load(state_path, map_location="cpu")
    stem = os.path.splitext(os.path.basename(state_path))[0]
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        t = tensor.to(torch.bfloat16) if bf16 and tensor.is_floating_point() else tensor
        n = t.numel() * t.element_size()
        if n > max_mb * 1e6:
            raise ValueError(f"{state_path}: tensor {key} alone is {n / 1e6:.1f} MB, over --max-mb {max_mb}")
        if size + n > max_mb * 1e6 and parts[-1]:
            parts.append({})
            size = 0
        parts[-1][key] = t
        size += n
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.part{i:02d}.pt") for i in range(len(parts))]
    for part, path in zip(parts, paths, strict=True):
        torch.save(part, path)
    return paths


def join(in_dir: str, state_path: str) -> int:
    paths = sorted(glob.glob(os.path.join(in_dir, "*.part[0-9][0-9].pt")))
    if not paths:
        raise FileNotFoundError(f"{in_dir}: no <stem>.partNN.pt files to join")
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        for key, t in torch.load(path, map_location="cpu").items():
            if key in state:
                raise ValueError(f"{path}: key {key} is already in an earlier part")
            state[key] = t.float() if t.is_floating_point() else t
    os.makedirs(os.path.dirname(os.path.abspath(state_path)), exist_ok=True)
    torch.save(state, state_path)
    return len(paths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("state")
    s.add_argument("out_dir")
    s.add_argument("--max-mb", type=float, default=13.0)
    s.add_argument("--bf16", action="store_true")
    j = sub.add_parser("join")
    j.add_argument("in_dir")
    j.add_argument("state")
    a = p.parse_args()
    if a.cmd == "split":
        print("\n".join(split(a.state, a.out_dir, a.max_mb, a.bf16)))
    else:
        print(f"{join(a.in_dir, a.state)} parts -> {a.state}")


if __name__ == "__main__":
    main()
