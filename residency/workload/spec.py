"""Workload: a model's blocks in execution order with bytes per format, FLOPs and memory, plus its phases.

The planner and the simulator see a model only through this: no torch module is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from functools import cached_property

from residency.errors import ResidencyError
from residency.formats import FORMATS
from residency.formats.base import StorageFormat
from residency.formats.dtypes import COMPUTE_DTYPE_BYTES, DTYPE_FORMAT, KV_DTYPE_BYTES
from residency.formats.sizing import effective_format

PERS = ("session", "latent_frame")  # how often a phase runs: once per session/prompt, or per latent frame
KV_ACCESS = ("none", "read", "read+write")
MAX_STEPS = 64  # denoise steps per latent frame; the simulator walks every block of a per-step pass each step
MAX_CONTEXT_FRAMES = 1024  # KV slots per block, latent frames; the largest catalog model keeps 12


@dataclass(frozen=True)
class BlockSpec:
    """One unit of residency. FLOPs of one call at batch 1 and `c` cached context frames:

    fixed_flops + flops_per_token·t + self_attn_flops_per_token_pair·t² + context_attn_flops_per_token_pair·t·c·f
    with t = tokens and f = context_tokens_per_frame; batch B multiplies the whole.
    """

    name: str  # "dit.blocks.7"
    component: str  # "encoder" | "dit" | "decoder" | "text_encoder" | …
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (name relative to the block, torch shape)
    tokens: int  # rows each call processes (tokens; latent pixels for conv blocks), batch 1
    flops_per_token: float  # dense matmul/conv FLOPs (+ fixed-length cross-attention) per token
    fixed_flops: float = 0.0  # per call, independent of tokens (adaLN projections of the conditioning)
    self_attn_flops_per_token_pair: float = 0.0  # Σ 4·width over self-attention layers
    context_attn_flops_per_token_pair: float = 0.0  # Σ 4·width over attention to cached frames
    context_tokens_per_frame: int = 0  # tokens a cached frame contributes to this block's context
    kv_channels_per_token: int = 0  # K+V channels cached per token (0: the block keeps no KV)
    activation_bytes_per_token: float = 0.0  # peak live activations per token at 2-byte compute dtype
    ops_per_call: int = 0  # aten ops one call dispatches, views included (0: unknown, estimated)
    kernels_per_call: int = 0  # of which launch a kernel (not views) (0: unknown, estimated)
    # activation elements read + written per call by the ops not timed by FLOPs (norms, elementwise, copies),
    # batch 1, counted on the meta device (residency.workload.op_count); 0: not counted, not charged
    activation_elements_per_call: int = 0
    # the same elements by size class of each op's largest tensor ((class, elements), op_count.size_class):
    # small tensors stay in cache and cost less per element; () when not counted by size
    activation_elements_by_size: tuple[tuple[int, int], ...] = ()
    # module paths the block's tensors come from, relative to the traced model (residency.workload.from_module);
    # () when not recorded. Descriptive: the fingerprint leaves it out, the costs do not read it
    modules: tuple[str, ...] = ()
    # (tensor name, dtype) of the tensors a model keeps in another floating dtype than its main one ("fp32",
    # "fp16", "bf16"; a bf16 model's fp32 norms, diffusers' and transformers' `_keep_in_fp32_modules`): each is
    # stored and computed at its own dtype whatever the block's format, never quantized. () when none is
    own_dtypes: tuple[tuple[str, str], ...] = ()
    # its tensors are read outside its own calls (a tied head as F.linear(x, self.emb.weight), seen by
    # residency.workload.from_module's trace): the runtime must keep them bound between its calls, so a model's
    # planner keeps the block resident for the session (residency.front_door.pinned_planner)
    read_outside_calls: bool = False

    def __post_init__(self) -> None:
        if self.own_dtypes:
            names = {n for n, _ in self.tensors}
            for n, d in self.own_dtypes:
                if n not in names or d not in DTYPE_FORMAT:
                    raise ResidencyError(f"block {self.name}: own dtype {d!r} of tensor {n!r}",
                                         hint=f"a tensor of the block in one of {', '.join(DTYPE_FORMAT)}")

    @cached_property
    def matrix_elements(self) -> tuple[int, ...]:
        """Elements of each weight matrix (two or more dims above 1, so a (384, 1, 1, 1) norm scale is a vector;
        a conv kernel counts whole): a matmul's FLOPs at a given row count are proportional to them, and its
        rate on a CPU depends on them (small matrices run slower, their DRAM fetch being latency-bound)."""
        return tuple(math.prod(s) for s in self._matrix_shapes)

    @cached_property
    def conv2d_kernels(self) -> tuple[bool, ...]:
        """Per entry of matrix_elements: is it a conv2d kernel (4-D: out, in, height, width)? A CPU profile times
        those apart (DeviceProfile.conv_tflops): oneDNN's convs run far from the matmul rate of a weight their size."""
        return tuple(len(s) == 4 for s in self._matrix_shapes)

    @cached_property
    def _matrix_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the weight matrices: two or more dims above 1 (matrix_elements)."""
        return tuple(s for _, s in self.tensors if sum(d > 1 for d in s) >= 2)

    @cached_property
    def block_class(self) -> str:
        """The block's name with its numbered segments as `*` ("dit.blocks.7" -> "dit.blocks.*"): the blocks of
        one repeated stack share a class (a calibrated profile scales compute per class)."""
        return ".".join("*" if part.isdigit() else part for part in self.name.split("."))

    @cached_property
    def params(self) -> int:
        """Weight elements of the block (all its tensors)."""
        return sum(math.prod(s) for _, s in self.tensors)

    def nbytes(self, fmt: str) -> int:
        """Bytes of the block's weights stored as `fmt` (vectors and odd shapes fall back to BF16; tensors of
        their own dtype stay in it). As the compute dtype's format ("BF16" for bf16): the weights computable."""
        return self._bytes_by_format[fmt]

    def quantized_weights(self, fmt: str) -> int:
        """Weights that really take `fmt` (the rest fall back or keep their own dtype): what a dequant kernel
        processes."""
        return self._quantized_by_format[fmt]

    def tensor_nbytes(self, fmt: str) -> tuple[int, ...]:
        """Bytes of each tensor stored as `fmt` (after the fallback rule), in tensor order."""
        return self._tensor_bytes_by_format[fmt]

    @cached_property
    def tensor_own_dtypes(self) -> tuple[str | None, ...]:
        """Each tensor's own dtype (own_dtypes), in tensor order; None: the block's compute dtype."""
        own = dict(self.own_dtypes)
        return tuple(own.get(n) for n, _ in self.tensors)

    @cached_property
    def _all_own_dtype(self) -> str | None:
        """The own dtype every tensor of the block keeps, when they all keep one; else None."""
        own = set(self.tensor_own_dtypes)
        return own.pop() if len(own) == 1 and None not in own else None

    def stored_formats(self, fmt: str) -> tuple[StorageFormat, ...]:
        """The format each tensor is really stored in when the block is stored as `fmt`, in tensor order: its
        own dtype's for a tensor of own_dtypes, else `fmt` after the fallback rule (effective_format)."""
        return self._formats_by_format[fmt]

    def converts(self, fmt: str, compute_dtype: str) -> tuple[bool, ...]:
        """Per tensor, in tensor order: does a dequant turn it into `compute_dtype` when the block is stored as
        `fmt`? Those stored in another format; a tensor of its own dtype never is (it computes in that)."""
        direct = DTYPE_FORMAT[compute_dtype]
        return tuple(own is None and f.name != direct
                     for f, own in zip(self.stored_formats(fmt), self.tensor_own_dtypes, strict=True))

    def converted(self, fmt: str, compute_dtype: str) -> tuple[tuple[tuple[int, ...], StorageFormat], ...]:
        """(shape, stored format) of the tensors a dequant turns into `compute_dtype` (converts)."""
        return tuple((s, f) for (_, s), f, c in zip(self.tensors, self.stored_formats(fmt),
                                                    self.converts(fmt, compute_dtype), strict=True) if c)

    def plain_tensor_nbytes(self, fmt: str, compute_dtype: str) -> tuple[int, ...]:
        """Bytes of each tensor a dequant into `compute_dtype` leaves as stored (not converts), in tensor order;
        cached per (fmt, compute_dtype): the simulator asks it per call of a CPU block that unpacks on load."""
        key = (fmt, compute_dtype)
        plain = self._plain_nbytes.get(key)
        if plain is None:
            plain = self._plain_nbytes[key] = tuple(
                n for n, c in zip(self.tensor_nbytes(fmt), self.converts(fmt, compute_dtype), strict=True) if not c)
        return plain

    @cached_property
    def _plain_nbytes(self) -> dict[tuple[str, str], tuple[int, ...]]:
        return {}

    def dequant_work(self, fmt: str, compute_dtype: str) -> tuple[tuple[str, int, int, tuple[tuple[int, int], ...]], ...]:
        """(stored format, unpack calls, weights, ((tensor weights, count), ...)) of what a dequant turns into
        `compute_dtype` when the block is stored as `fmt` (converted, grouped by format: one unpack call per tensor,
        as the runtime unpacks; each format's tensor sizes, smallest first, for a cost per tensor size); cached per
        (fmt, compute_dtype), the planner asks it for every candidate."""
        key = (fmt, compute_dtype)
        work = self._dequant_work.get(key)
        if work is None:
            groups: dict[str, dict[int, int]] = {}
            for shape, f in self.converted(fmt, compute_dtype):
                sizes = groups.setdefault(f.name, {})
                n = math.prod(shape)
                sizes[n] = sizes.get(n, 0) + 1
            work = self._dequant_work[key] = tuple(
                (f, sum(sizes.values()), sum(n * c for n, c in sizes.items()), tuple(sorted(sizes.items())))
                for f, sizes in groups.items())
        return work

    @cached_property
    def _dequant_work(self) -> dict[tuple[str, str], tuple[tuple[str, int, int, tuple[tuple[int, int], ...]], ...]]:
        return {}

    @cached_property
    def _formats_by_format(self) -> dict[str, tuple[StorageFormat, ...]]:
        own = [FORMATS[DTYPE_FORMAT[d]] if d is not None else None for d in self.tensor_own_dtypes]
        return {name: tuple(o or effective_format(f, s) for (_, s), o in zip(self.tensors, own, strict=True))
                for name, f in FORMATS.items()}

    @cached_property
    def _tensor_bytes_by_format(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(f.nbytes(s) for (_, s), f in zip(self.tensors, self._formats_by_format[name], strict=True))
                for name in FORMATS}

    @cached_property
    def _bytes_by_format(self) -> dict[str, int]:
        return {name: sum(sizes) for name, sizes in self._tensor_bytes_by_format.items()}

    @cached_property
    def _quantized_by_format(self) -> dict[str, int]:
        return {name: sum(math.prod(s) for (_, s), eff, own in zip(self.tensors, self._formats_by_format[name],
                                                                  self.tensor_own_dtypes, strict=True)
                          if eff is f and own is None)
                for name, f in FORMATS.items()}

    def flops(self, context_frames: int, batch: int = 1) -> float:
        """FLOPs of one call over `batch` items, attending to `context_frames` cached frames."""
        t = self.tokens
        ctx = context_frames * self.context_tokens_per_frame
        per_item = (self.fixed_flops + self.flops_per_token * t + self.self_attn_flops_per_token_pair * t * t
                    + self.context_attn_flops_per_token_pair * t * ctx)
        return batch * per_item

    def kv_bytes_per_frame(self, kv_dtype: str, batch: int = 1) -> int:
        """Bytes one cached latent frame takes in this block's KV slots."""
        return batch * self.context_tokens_per_frame * self.kv_channels_per_token * KV_DTYPE_BYTES[kv_dtype]

    def activation_bytes(self, compute_dtype: str, batch: int = 1) -> int:
        """Activation bytes one call holds at its peak in `compute_dtype` (KeyError if unknown) — in its own dtype
        for a block whose every tensor keeps one (a fp32 VAE beside a bf16 denoiser computes in fp32)."""
        scale = COMPUTE_DTYPE_BYTES[self._all_own_dtype or compute_dtype] / 2
        return int(math.ceil(batch * self.tokens * self.activation_bytes_per_token * scale))


@dataclass(frozen=True)
class PassSpec:
    """One pass over some blocks within a phase: their order, how often it runs, its KV access."""
    blocks: tuple[str, ...]  # block names in execution order
    per_step: bool = False  # True: runs once per denoise step (×steps); False: once per phase run
    kv: str = "none"  # "none" | "read" | "read+write" of the temporal KV cache
    purpose: str = ""


@dataclass(frozen=True)
class PhaseSpec:
    """A phase (encode, denoise, decode): its passes, run once per session or per latent frame."""
    name: str  # "encode" | "denoise" | "decode"
    per: str  # "session" | "latent_frame"
    passes: tuple[PassSpec, ...]

    @property
    def blocks(self) -> tuple[str, ...]:
        """Distinct blocks of the phase, first-use order."""
        return tuple(dict.fromkeys(b for p in self.passes for b in p.blocks))


@dataclass(frozen=True)
class Workload:
    """A model as the planner sees it: blocks in execution order with sizes and FLOPs, and phases."""
    name: str  # model name, e.g. "lucid-500m"
    blocks: tuple[BlockSpec, ...]  # in execution order
    phases: tuple[PhaseSpec, ...]  # in execution order
    steps: int  # denoise steps per latent frame
    context_frames: int  # KV slots per block, latent frames (0: no temporal cache)
    batch: int = 1
    kv_dtype: str = "bf16"  # default KV storage
    video_frames_per_latent: int = 1  # temporal compression: video frames one latent frame decodes to
    source: str = ""  # where the inventory came from
    extra: dict = field(default_factory=dict, compare=False)  # free-form descriptive facts

    def __post_init__(self) -> None:
        names = [b.name for b in self.blocks]
        if len(set(names)) != len(names):
            raise ResidencyError(f"workload {self.name}: duplicate block names")
        known = set(names)
        for phase in self.phases:
            if phase.per not in PERS:
                raise ResidencyError(f"workload {self.name}: phase {phase.name} has per={phase.per!r}",
                                     hint=f"one of {', '.join(PERS)}")
            for p in phase.passes:
                missing = [b for b in p.blocks if b not in known]
                if missing:
                    raise ResidencyError(f"workload {self.name}: phase {phase.name} names unknown blocks "
                                         f"{missing[:3]}")
                if p.kv not in KV_ACCESS:
                    raise ResidencyError(f"workload {self.name}: pass kv={p.kv!r}", hint=", ".join(KV_ACCESS))

    @cached_property
    def by_name(self) -> dict[str, BlockSpec]:
        """Block name -> its BlockSpec."""
        return {b.name: b for b in self.blocks}

    @property
    def components(self) -> list[str]:
        """Component names (e.g. "encoder", "dit") in order of their first block."""
        return list(dict.fromkeys(b.component for b in self.blocks))

    @property
    def params(self) -> int:
        """Weight elements of all blocks."""
        return sum(b.params for b in self.blocks)

    def nbytes(self, fmt: str) -> int:
        """Bytes of all blocks' weights stored as `fmt` (KeyError for a format not described)."""
        return sum(b.nbytes(fmt) for b in self.blocks)

    def kv_cache_bytes(self, kv_dtype: str | None = None) -> int:
        """KV slots of every block at the full window: context_frames frames each."""
        dtype = kv_dtype or self.kv_dtype
        return self.context_frames * sum(b.kv_bytes_per_frame(dtype, self.batch) for b in self.blocks)

    def phase(self, name: str) -> PhaseSpec:
        """The phase called `name`; raises ResidencyError when there is none."""
        for p in self.phases:
            if p.name == name:
                return p
        raise ResidencyError(f"workload {self.name} has no phase {name!r}")

    def frame_phases(self) -> tuple[PhaseSpec, ...]:
        """The phases that run once per latent frame, in execution order."""
        return tuple(p for p in self.phases if p.per == "latent_frame")

    def session_phases(self) -> tuple[PhaseSpec, ...]:
        """The phases that run once per session, in execution order."""
        return tuple(p for p in self.phases if p.per == "session")

    def frame_unit(self) -> str:
        """What one predicted "frame" is: a latent frame of a world model (a KV window of past frames), else a
        video or an image where the workload decodes one (a text-to-video or text-to-image pipeline's call; a
        video's frames are video_frames_per_latent), else one call of the model, or "4 calls" where the model is
        called once per step at 4 steps (a lone denoiser planned with --steps 4: its ms are for the four)."""
        if self.context_frames > 0:
            return "latent frame"
        if any(ph.name == "decode" for ph in self.phases):
            return "video" if self.video_frames_per_latent > 1 else "image"
        calls = self.calls_per_frame_unit()
        return "call" if calls == 1 else f"{calls} calls"

    def calls_per_frame_unit(self) -> int:
        """Calls of the model in one "call"-unit frame (frame_unit): its steps where a pass runs once per step."""
        return self.steps if any(p.per_step for ph in self.phases for p in ph.passes) else 1

    def count(self, p: PassSpec) -> int:
        """Runs of a pass per run of its phase."""
        return self.steps if p.per_step else 1

    def calls_per_frame(self, block: str) -> int:
        """Calls of block `block` in one latent frame (passes per step count `steps` times)."""
        return sum(self.count(p) for ph in self.frame_phases() for p in ph.passes if block in p.blocks)

    def flops_per_frame(self) -> float:
        """Steady state: every cached slot full."""
        return sum(self.by_name[b].flops(self.context_frames, self.batch) * self.count(p)
                   for ph in self.frame_phases() for p in ph.passes for b in p.blocks)

    def with_params(self, steps: int | None = None, context_frames: int | None = None,
                    batch: int | None = None) -> Workload:
        """The same model at other generation parameters."""
        for what, v, low, high in (("steps", steps, 1, MAX_STEPS), ("batch", batch, 1, None),
                                   ("context_frames", context_frames, 0, MAX_CONTEXT_FRAMES)):
            if v is not None and not (low <= v and (high is None or v <= high)):
                span = f"from {low} to {high}" if high is not None else f"at least {low}"
                raise ResidencyError(f"{what} must be {span}, got {v}")
        return replace(self, steps=self.steps if steps is None else steps,
                       context_frames=self.context_frames if context_frames is None else context_frames,
                       batch=self.batch if batch is None else batch)

    def fingerprint(self) -> str:
        """Changes when any block's tensors, tokens or FLOP coefficients, or the schedule, change."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        # computed once per Workload (frozen: its fields never change): the planner checks every plan it
        # simulates against it, ~0.01 s a time on Flux's 1,000 tensors, a second of a 3.6 s plan before
        doc = {
            "blocks": [[b.name, b.component, [[n, list(s)] for n, s in b.tensors], b.tokens, b.fixed_flops, b.flops_per_token,
                        b.self_attn_flops_per_token_pair, b.context_attn_flops_per_token_pair,
                        b.context_tokens_per_frame, b.kv_channels_per_token, b.ops_per_call, b.kernels_per_call,
                        # the element counts only when counted: uncounted workloads keep their fingerprints
                        *([b.activation_elements_per_call, [list(p) for p in b.activation_elements_by_size]]
                          if b.activation_elements_per_call else []),
                        # own dtypes change the bytes: only when there are any (other fingerprints stay)
                        *([["own_dtypes", [list(p) for p in b.own_dtypes]]] if b.own_dtypes else []),
                        *([["read_outside_calls"]] if b.read_outside_calls else [])]
                       for b in self.blocks],
            "phases": [[ph.name, ph.per, [[list(p.blocks), p.per_step, p.kv] for p in ph.passes]] for ph in self.phases],
            "params": [self.steps, self.context_frames, self.batch],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
