"""A disk cache of a frozen main model's hidden states h0, for head-only training (docs/design.md §3.2).

With the main model frozen, h0 of a training window depends only on its tokens, the main model's weights and
how they are computed (runtime, dtype, autocast). On SmolLM2 computing it is about half of a head-only step
(bf16, 1 thread: ~1.8 of ~3.4 CPU-seconds per 1,024 tokens), so runs that train heads on the same windows again
(MTP vs MTP-D, ablations, head initialisations, independent heads, a run that revisits its windows) read it
instead (`--teacher-cache`). Only h0 is kept: the teacher's logits over the draft vocabulary are
W_out[ids] · final_norm(h0), ~2% of a step, so one cache serves every draft vocabulary, top-N, temperature and
objective, and costs d values per token instead of N (SmolLM2 in bf16: 1,152 bytes per token, 1.2 GB per
million tokens).

Entries are content-addressed: a window's file is named by a hash of its tokens, inside a directory named by
a hash of the main model's weights and computation; each is written atomically (atomic.py), so concurrent
runs and crashes never leave a partial entry, and a changed model never reads another's states. The cache
is only ever a speed-up, so it never fills its disk: no entry is written while the disk holding it has less
than MIN_FREE_BYTES free (a run on a large corpus then computes the windows it could not store).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

from mtpd.atomic import atomic_file
from mtpd.config import TEACHER_CACHE_MIN_FREE_BYTES as MIN_FREE_BYTES  # free space an entry may not eat into
from mtpd.data import cache_root

# Raise when what an entry holds changes (the decoder's arithmetic, the layout of a file).
CACHE_VERSION = 1


def model_fingerprint(main: nn.Module, autocast: torch.dtype | None) -> str:
    """A hash of everything h0 depends on besides the tokens: the weights' values, names, shapes and dtypes,
    the runtime computing them, and the autocast dtype. Hashing SmolLM2's weights takes about a second."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{CACHE_VERSION}|{type(main).__name__}|{main.runtime}|{autocast}".encode())
    hashed = set()
    for name, tensor in sorted(main.state_dict().items()):
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.data_ptr() not in hashed:  # tied weights (embedding = output layer): their values once
            hashed.add(tensor.data_ptr())
            digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().data)
    return digest.hexdigest()


class TeacherCache:
    """h0 of training windows, read from `directory` when there and computed (then stored) when not."""

    def __init__(self, main: nn.Module, autocast: torch.dtype | None, root: Path | None = None):
        self.directory = (root or cache_root()) / "teacher" / model_fingerprint(main, autocast)
        self.hits = self.misses = 0
        self.unstored = 0  # windows computed but not written: too little free disk

    def hidden_states(self, main: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """h0 [B, T, d] of tokens [B, T] under the frozen `main` (called in the trainer's autocast)."""
        rows = [self._read(row) for row in tokens]
        missing = [i for i, h in enumerate(rows) if h is None]
        if missing:
            with torch.no_grad():
                computed = main(tokens[missing])
            room = self._has_room()
            for i, h in zip(missing, computed):
                if room:
                    self._write(tokens[i], h)
                rows[i] = h
            self.unstored += 0 if room else len(missing)
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        return torch.stack([h.to(tokens.device) for h in rows])

    def _has_room(self) -> bool:
        existing = next(path for path in (self.directory, *self.directory.parents) if path.exists())
        return shutil.disk_usage(existing).free >= MIN_FREE_BYTES

    def _path(self, tokens: torch.Tensor) -> Path:
        key = hashlib.blake2b(tokens.to(torch.int64).cpu().numpy().tobytes(), digest_size=16).hexdigest()
        return self.directory / key[:2] / f"{key[2:]}.bin"

    def _read(self, tokens: torch.Tensor) -> torch.Tensor | None:
        try:
            raw = bytearray(self._path(tokens).read_bytes())
        except OSError:
            return None
        header, _, payload = raw.partition(b"\n")
        try:
            dtype_name, width = header.decode().split()
            h = torch.frombuffer(payload, dtype=getattr(torch, dtype_name)).view(len(tokens), int(width))
        except (ValueError, AttributeError, RuntimeError):
            return None  # a file from another layout or cut short: computed again and overwritten
        return h

    def _write(self, tokens: torch.Tensor, h: torch.Tensor) -> None:
        header = f"{str(h.dtype).removeprefix('torch.')} {h.shape[-1]}\n".encode()
        try:
            with atomic_file(self._path(tokens)) as tmp:
                tmp.write_bytes(header + h.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        except OSError:
            pass  # a full or read-only disk costs the next run time, not correctness
