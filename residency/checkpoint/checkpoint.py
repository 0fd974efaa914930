"""Checkpoint: a validated inventory of tensors over memory-mapped files, and open_checkpoint.

Opening reads only headers; tensor bytes are reached through copy-on-write memory maps,
so read_packed costs page faults on first touch, not a read of the whole file.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import torch

from residency.checkpoint.entry import E4M3, TensorEntry
from residency.checkpoint.errors import CheckpointError, broken
from residency.checkpoint.gguf_io import DEFAULT_ARCH, read_gguf
from residency.checkpoint.limits import check_tensor_count
from residency.checkpoint.safetensors_io import LeftOut, read_safetensors
from residency.checkpoint.sniff import file_kind, named_otherwise
from residency.formats import get_format
from residency.jsonfile import read_json
from residency.userpath import DIRECTORY, FILE, MISSING, path_kind
from residency.validate import a_type


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a header's objects are built: they hold no cycles, and each
    generation-2 pass would rescan all of them (open of 200k tensors: ~2× slower with it on)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_READERS = {".safetensors": read_safetensors, ".gguf": read_gguf}


class Checkpoint:
    """Tensors of one file or one directory of shards. Use as a context manager, or close()."""

    def __init__(self, paths: list[Path], entries: dict[str, TensorEntry], metadata: dict[str, str],
                 left_out: list[LeftOut] | None = None):
        self.paths = paths
        self.entries = entries  # in file order (shards in sorted order)
        # tensors of dtypes residency does not store (position ids, masks, float64): listed, never read
        self.left_out = left_out or []
        self.metadata = metadata  # merged; on a key clash the first shard wins
        self._maps: dict[Path, np.memmap] | None = {}
        ends = {p: 0 for p in paths}
        for e in entries.values():
            ends[e.path] = max(ends[e.path], e.offset + e.nbytes)
        for p, end in ends.items():
            if end == 0:
                continue
            # mode "c": copy-on-write. Tensors handed out are writable without warnings;
            # writing to one changes this process's view only, never the file.
            mm = np.memmap(p, mode="c")
            if len(mm) < end:  # the file shrank after its header was checked
                raise broken(p, f"file is now {len(mm)} bytes but its tensors end at byte {end}")
            self._maps[p] = mm

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data as stored, summed over all entries."""
        return sum(e.nbytes for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files"
        return f"Checkpoint({where}, {len(self.entries)} tensors, {self.total_bytes} bytes)"

    def close(self) -> None:
        """Drop the file maps. Tensors already returned keep their pages mapped until freed."""
        self._maps = None

    def entry(self, name: str) -> TensorEntry:
        e = self.entries.get(name)
        if e is None:
            where = ", ".join(str(p) for p in self.paths[:3])
            raise broken(where, f"no tensor named {name!r:.80}", hint="list its tensors with `residency inspect --json`")
        return e

    def read_packed(self, name: str) -> torch.Tensor:
        """The packed blob of `name`: a flat uint8 CPU tensor of the format's packed size.

        Zero-copy over the memory map (entry.zero_copy); raw F8_E4M3 tensors are rebuilt
        into the FP8 layout (rows × float32 scale 1.0, then the bytes): one copy.
        Hazard: if the file is truncated by someone else while mapped, touching the pages raises SIGBUS.
        """
        e = self.entry(name)
        if self._maps is None:
            raise broken(e.path, "checkpoint is closed", hint="read tensors before close(), or reopen it")
        if e.nbytes == 0:
            raw = torch.empty(0, dtype=torch.uint8)
        else:
            raw = torch.from_numpy(self._maps[e.path][e.offset : e.offset + e.nbytes])
        if e.encoding != E4M3:
            return raw
        rows = math.prod(e.shape[:-1])  # FP8 keeps one scale per row; () and (n,) are one row
        out = torch.empty(rows * 4 + e.nbytes, dtype=torch.uint8)
        out[: rows * 4].view(torch.float32).fill_(1.0)
        out[rows * 4 :].copy_(raw)
        return out

    def read_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize `name` into a new CPU tensor of its torch shape (allocates output size)."""
        e = self.entry(name)
        fmt = get_format(e.format)
        shape = e.stored_shape or e.shape or (1,)
        return fmt.dequantize(self.read_packed(name), shape, dtype).reshape(e.shape)


def _checkpoint_files(path: Path, only: Collection[str] | None = None) -> tuple[list[Path], dict[Path, dict[str, str]]]:
    """The files to read and, for a directory, its shard indexes (read once: checked before and after); `only`: of
    a directory, the file names to read (one variant of a model), and the indexes naming only those."""
    kind, reason = path_kind(path)
    if kind == DIRECTORY:
        try:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in _READERS and not p.name.startswith(".")
                           and (only is None or p.name in only))
        except OSError as e:
            raise broken(path, f"cannot list it ({e.strerror or e})", hint="check its permissions") from None
        for p in files:  # skipped, a shard not there was a smaller model, silently (a snapshot copied without blobs)
            shard_kind, why = path_kind(p)
            if shard_kind != FILE:
                link = f"a link to {os.readlink(p)!r} that " if p.is_symlink() else ""
                hint = ("copy the file it names into place (a model snapshot copied without its blobs), or remove it"
                        if shard_kind == MISSING else
                        "move it out of the directory: every .safetensors or .gguf file in it is read as a shard")
                raise broken(p, f"{link}{'is missing' if shard_kind == MISSING else f'is not a file ({why or shard_kind})'}",
                             hint=hint)
        indexes = shard_indexes(path)
        if only is not None:  # another variant's index names its own shards
            indexes = {i: m for i, m in indexes.items() if set(m.values()) <= set(only)}
        if not files and not any(indexes.values()):
            raise broken(
                path,
                "directory holds no .safetensors or .gguf files",
                hint="point at a checkpoint file or shard directory",
            )
        _check_shards_complete(path, files, indexes)  # an index whose shards are all missing: named here
        return files, indexes
    if kind == MISSING:
        raise broken(path, "no such file or directory", hint="check the path; give a .safetensors or .gguf file or a directory of shards")
    if kind != FILE:  # a FIFO would block open() forever; an over-long name raises from stat
        raise broken(path, f"cannot read it ({reason})", hint="give a regular .safetensors or .gguf file")
    if path.suffix.lower() not in _READERS:
        kind = file_kind(path)
        if kind is not None:  # a GGUF renamed .bin, a pickle, a JSON document: said by what it is
            raise broken(path, *named_otherwise(path, kind))
        raise broken(
            path,
            f"unknown checkpoint extension {path.suffix!r}",
            hint="expected .safetensors, .gguf or a directory",
        )
    return [path], {}


SHARD_INDEX_SUFFIXES = (".safetensors.index.json", ".gguf.index.json")  # the indexes of the files read here
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.(?:safetensors|gguf)$", re.IGNORECASE)


def shard_indexes(directory: Path) -> dict[Path, dict[str, str]]:
    """The shard indexes of the directory (`*.safetensors.index.json`, `*.gguf.index.json`: only those of the
    files read here — a repository shipping .bin shards beside .safetensors ones has a pytorch_model.bin.index.json
    naming shards a safetensors-only download rightly leaves out): index -> its weight_map (tensor -> file).
    Raises CheckpointError for an index that is not one, or names a file outside the directory."""
    out = {}
    for index in sorted(p for p in directory.iterdir() if p.name.lower().endswith(SHARD_INDEX_SUFFIXES)):
        doc = read_json(index, "a shard index", "remove it, or download it again")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise broken(index, "not a shard index: it needs a \"weight_map\" object of tensor name -> shard file",
                         hint="remove it, or download it again")
        # "./model-00001-of-00002.safetensors" is beside it too
        weight_map = {k: v[2:] if v.startswith("./") else v for k, v in weight_map.items()}
        outside = next((v for v in weight_map.values() if "/" in v or "\\" in v or v in ("", ".", "..")), None)
        if outside is not None:
            raise broken(index, f"its weight_map names {outside!r:.80}, a file outside this directory",
                         hint="an index names the shards beside it by file name; remove it, or download it again")
        out[index] = weight_map
    return out


def variant_of(file: Path) -> str:
    """"fp16" of diffusion_pytorch_model.fp16.safetensors (or of its shard …fp16-00001-of-00002…); "" for the plain
    file diffusers and transformers load by default (no `variant=`)."""
    m = _SHARD_NAME.match(file.name)
    stem = m["stem"] if m else file.name[: -len(file.suffix)]
    return stem.partition(".")[2]


def one_variant(weights: list[Path]) -> list[Path]:
    """The files of one variant: the plain one where it is there (what from_pretrained loads without variant=), else
    the first variant by name. A Hub download holds both (model.safetensors and model.fp16.safetensors): read
    together, every tensor is there twice."""
    variants = sorted({variant_of(f) for f in weights})
    chosen = "" if "" in variants else (variants[0] if variants else "")
    return [f for f in weights if variant_of(f) == chosen]


def promised_shards(files: list[Path]) -> set[str]:
    """Every shard name the files' `STEM-0000k-of-0000n.ext` promise (a series of up to 100,000)."""
    expected: set[str] = set()
    for f in files:
        m = _SHARD_NAME.match(f.name)
        if m and 0 < int(m["n"]) <= 100_000:
            width, ext = len(m["i"]), f.suffix
            expected |= {f"{m['stem']}-{k:0{width}d}-of-{m['n']}{ext}" for k in range(1, int(m["n"]) + 1)}
    return expected


def _check_shards_complete(directory: Path, files: list[Path], indexes: dict[Path, dict[str, str]]) -> None:
    """A half-finished download holds some shards: the rest are named by the files' `-0000k-of-0000n` and by an
    index's weight_map. Read as it is, it would be half a model with nothing said (its totals halved). A file
    no index names beside an index (a stray or older shard) is refused too: its tensors would be added to the
    model's."""
    present = {f.name for f in files}
    expected = promised_shards(files)
    listed = {v for weight_map in indexes.values() for v in weight_map.values()
              if v.lower().endswith((".safetensors", ".gguf"))}
    expected |= listed
    missing = sorted(expected - present)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise broken(directory, f"{len(missing)} shard(s) of this checkpoint are missing: {shown}",
                     hint="finish the download (the shard names and the index say which files belong), or "
                          "remove the index and the partial shards")
    stray = sorted(present - listed) if indexes else []
    if stray:
        named = ", ".join(i.name for i in indexes)
        if _sibling_shard(stray[0], listed):
            # named as one of the listed shards' series: the index, not the shard, is what is wrong (moving the
            # shard away, as the hint below says of a stray file, would lose its weights)
            raise broken(directory / stray[0], f"no shard index of the directory names it ({named}), yet it is named "
                                               "as a shard of the same series as those the index names",
                         hint="the index is wrong or of another download: download the index again (keep the shard: "
                              "moving it away loses its weights)")
        raise broken(directory / stray[0], f"no shard index of the directory names it ({named})",
                     hint="move it out of the directory (a stray or older shard), or remove the index if it "
                          "belongs")


def _sibling_shard(name: str, listed: set[str]) -> bool:
    """Whether `name` is `STEM-0000k-of-0000n.ext` with the stem, count and extension of a listed shard."""
    m = _SHARD_NAME.match(name)
    if m is None:
        return False
    for other in listed:
        o = _SHARD_NAME.match(other)
        if o is not None and (o["stem"], o["n"]) == (m["stem"], m["n"]) and Path(other).suffix == Path(name).suffix:
            return True
    return False


def _check_index_matches(indexes: dict[Path, dict[str, str]], entries: dict[str, TensorEntry],
                         left_out: list[LeftOut]) -> None:
    """Every tensor an index names is in the shard it names (a ghost tensor, or one in another shard, means the
    index and the shards are not of one download)."""
    other = {o.name for o in left_out}
    for index, weight_map in indexes.items():
        for name, shard in weight_map.items():
            e = entries.get(name)
            if e is None and name not in other:
                raise broken(index, f"names tensor {name!r:.80} in {shard!r:.80}, which does not hold it",
                             hint="the index and the shards are not of one download: download them again")
            if e is not None and e.path.name != shard:
                raise broken(index, f"puts tensor {name!r:.80} in {shard!r:.80}; it is in {e.path.name!r:.80}",
                             hint="the index and the shards are not of one download: download them again")


def _refuse_model_twice(root: Path, file: Path, meta: dict[str, str], files: list[Path]) -> None:
    """A directory of safetensors beside a GGUF that llama.cpp converted (its general.architecture is a model's, not
    ours) holds one model twice under two naming schemes (model.layers.0.… and blk.0.…): read as shards they added
    up to twice its parameters, silently. Shards residency wrote itself carry general.architecture "residency"."""
    if file.suffix.lower() != ".gguf" or not root.is_dir():
        return
    arch = meta.get("general.architecture", "")
    others = [f for f in files if f.suffix.lower() == ".safetensors"]
    if arch and arch != DEFAULT_ARCH and others:
        raise broken(root, f"holds {others[0].name} and {file.name}, a GGUF converted for llama.cpp (architecture "
                           f"{arch!r:.40}): most likely one model twice, which read as shards would count twice",
                     hint=f"give one file: residency inspect {root / others[0].name} (or {root / file.name})")


def open_checkpoint(path: str | os.PathLike[str], only: Collection[str] | None = None) -> Checkpoint:
    """Open a .safetensors file, a .gguf file, or a directory of shards (both kinds, sorted by name; `only`: the
    names of the directory's files to read, e.g. one_variant's).

    Every header is validated before anything is mapped; any problem is a CheckpointError
    naming the file. Duplicate tensor names across shards are an error.
    """
    if not isinstance(path, (str, os.PathLike)):  # None, bytes: a bare TypeError from pathlib
        raise CheckpointError(f"open_checkpoint's path is {a_type(path)}",
                              hint="give a .safetensors or .gguf file, or a directory of shards, as a str or Path")
    root = Path(os.fspath(path))
    entries: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    left_out: list[LeftOut] = []
    files, indexes = _checkpoint_files(root, only)
    for file in files:
        try:
            size = file.stat().st_size
            with gc_paused():
                found, meta, others = _READERS[file.suffix.lower()](file, size)
            left_out += others
        except OSError as e:
            raise broken(
                file, f"cannot read it ({e.strerror or e})", hint="check the path and its permissions"
            ) from None
        for e in found:
            if e.name in entries:
                raise broken(
                    file,
                    f"tensor {e.name!r:.80} is also in {entries[e.name].path}",
                    hint=f"two files holding the same tensors are most often two copies of one model (fp16 and full "
                         f"precision, two quantizations): give one of them, e.g. {entries[e.name].path}; the shards "
                         "of one model hold distinct tensors",
                )
            entries[e.name] = e
        _refuse_model_twice(root, file, meta, files)
        check_tensor_count(file, len(entries))  # shards together: the cost is per tensor, not per file
        for key, value in meta.items():
            metadata.setdefault(key, value)
    _check_index_matches(indexes, entries, left_out)
    try:
        return Checkpoint(files, entries, metadata, left_out)
    except (OSError, ValueError) as e:
        raise broken(root, f"cannot memory-map it ({e})", hint="check the file is on a local file system and readable") from None
