"""What a file is by its first bytes, for the error when its name says otherwise (a GGUF renamed .bin, a profile
JSON renamed .safetensors, a torch.save pickle): the readers dispatch on the extension and never unpickle."""

from __future__ import annotations

from pathlib import Path

HEAD_BYTES = 24  # enough for every signature below (an LFS pointer's 23)

GGUF, SAFETENSORS, JSON, PICKLE, LFS = "gguf", "safetensors", "json", "pickle", "lfs"
LFS_POINTER = b"version https://git-lfs"  # the first bytes of a Git LFS pointer file (a clone without `git lfs pull`)
SUFFIX = {GGUF: ".gguf", SAFETENSORS: ".safetensors"}
WORDS = {
    GGUF: "a GGUF file (it starts with the GGUF magic)",
    SAFETENSORS: "a safetensors file (a header length, then a JSON header)",
    JSON: "a JSON document (a config, profile or plan?), not a checkpoint",
    # a zip or a pickle: torch.save writes both (so does numpy's .npz a zip); residency never unpickles
    PICKLE: "a zip archive or a Python pickle (torch.save writes these), which residency never loads: unpickling "
            "runs code",
    LFS: "a Git LFS pointer (a text file naming the weights), not the weights: the repository was cloned without "
         "them",
}
HINTS = {
    JSON: "give a .safetensors or .gguf checkpoint",
    PICKLE: "if it is a torch.save checkpoint, convert it where you trust it: "
            "safetensors.torch.save_file(torch.load(path), 'model.safetensors')",
    LFS: "fetch the weights: `git lfs pull` in the clone (or download the file itself, e.g. huggingface-cli "
         "download)",
}


def content_kind(head: bytes, size: int) -> str | None:
    """The kind of file `head` (its first bytes, of a file of `size` bytes) starts, or None when none is told."""
    if head[:4] == b"GGUF":
        return GGUF
    if head.startswith(LFS_POINTER):
        return LFS
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return SAFETENSORS
    stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace, a UTF-8 BOM
    # an object or array, then (past the whitespace of an indented document) a key, an object or its end: not a
    # Markdown "[link]" or CSV
    if stripped[:1] in (b"{", b"[") and stripped[1:].lstrip(b" \t\r\n")[:1] in (b'"', b"{", b"}", b"]"):
        return JSON
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return PICKLE
    return None


def file_kind(path: Path) -> str | None:
    """content_kind of the file at `path` (None when it cannot be read: the caller's own error says why)."""
    try:
        with open(path, "rb") as f:
            return content_kind(f.read(HEAD_BYTES), path.stat().st_size)
    except OSError:
        return None


def named_otherwise(path: Path, kind: str) -> tuple[str, str]:
    """(problem, hint) for a file of `kind` where a checkpoint of another was expected: rename it (a checkpoint
    under another name), or what to give instead."""
    if kind in SUFFIX:
        return (f"named {path.suffix or 'without an extension'}, but this is {WORDS[kind]}",
                f"rename it to {path.with_suffix(SUFFIX[kind]).name}")
    return f"this is {WORDS[kind]}", HINTS[kind]
