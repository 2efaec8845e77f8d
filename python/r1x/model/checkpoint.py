"""Checkpoint I/O in the Hugging Face DeepseekV3 layout.

A checkpoint is a directory with ``config.json``, safetensors shards named
``model-00001-of-0000n.safetensors`` and ``model.safetensors.index.json`` (``{"metadata":
{"total_size": bytes}, "weight_map": {name: shard}}``); a single ``model.safetensors`` without an
index (what ``save_pretrained`` writes for a small model) loads too. Parameter names are
transformers' ``DeepseekV3ForCausalLM`` names.

Routed experts are written one expert at a time (``mlp.experts.{j}.gate_proj.weight``,
``up_proj``, ``down_proj``), the way DeepSeek-V3 ships them and transformers' ``save_pretrained``
writes them; :func:`load_state_dict` fuses them back into the in-memory layout
(``mlp.experts.gate_up_proj [E, 2I, H]`` and ``mlp.experts.down_proj [E, H, I]``) unless asked not
to. Either layout is accepted on both sides.

FP8: with ``save_state_dict(..., fp8=True)`` the projection weights DeepSeek-V3 quantizes
(attention projections, dense/shared/routed expert MLP projections; not embeddings, norms, the
router gate, ``lm_head`` or the MTP ``eh_proj``/``shared_head``) are stored as
``float8_e4m3fn`` with a float32 ``<name>_scale_inv`` of shape ``[ceil(N/128), ceil(K/128)]``
(one scale per 128x128 block, ``w ~= q * scale_inv``), and ``config.json`` gets DeepSeek's
``quantization_config``. Tensors already in e4m3 (a model after ``to_fp8()``) are written as they
are, with their scales.

Multi-token prediction: DeepSeek-V3 stores MTP module ``i`` as ``model.layers.{L + i}.*`` where
``L = num_hidden_layers``; :func:`mtp_keys`, :func:`split_mtp_state_dict` and
:func:`merge_mtp_state_dict` find those keys and map them to and from a model-side prefix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = [
    "save_state_dict",
    "load_state_dict",
    "LoadedCheckpoint",
    "FP8_QUANTIZATION_CONFIG",
    "is_fp8_quantized_weight",
    "mtp_keys",
    "split_mtp_state_dict",
    "merge_mtp_state_dict",
    "mtp_key_to_local",
    "local_key_to_mtp",
    "split_experts",
    "fuse_experts",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
FP8_BLOCK = 128
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# metadata key (index "metadata" and each shard's header) recording names dropped as aliases
TIED_METADATA_KEY = "r1x_tied_weights"
# kept in float32 whatever the requested dtype (transformers' _keep_in_fp32_modules_strict)
_KEEP_FP32 = re.compile(r"(^|\.)(e_score_correction_bias|mlp\.gate\.weight)$")

# 2-D weights DeepSeek-V3 ships in e4m3: MLA projections and every MLP projection (dense, shared
# and routed experts); the router (`mlp.gate`), norms, embeddings, lm_head and eh_proj stay high
# precision.
_FP8_WEIGHT = re.compile(
    r"(^|\.)("
    r"self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj)"
    r")\.weight$"
)
# fused routed experts (the in-memory layout, r1x.nn.MoEExperts and transformers 5)
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_SPLIT_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<j>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def is_fp8_quantized_weight(name: str) -> bool:
    """Whether DeepSeek-V3 stores parameter ``name`` (HF naming) in e4m3 with a block scale."""
    return bool(_FP8_WEIGHT.search(name)) or bool(_FUSED_EXPERTS.match(name))


# ---------------------------------------------------------------------------------------------
# MTP keys
# ---------------------------------------------------------------------------------------------


def _num_hidden_layers(config_or_layers) -> int:
    if isinstance(config_or_layers, int):
        return config_or_layers
    if isinstance(config_or_layers, Mapping):
        return int(config_or_layers["num_hidden_layers"])
    return int(config_or_layers.num_hidden_layers)


def mtp_keys(keys: Iterable[str], config_or_num_hidden_layers) -> list[str]:
    """The keys of ``keys`` that belong to MTP modules: ``model.layers.{n}.*`` with ``n >= L``."""
    L = _num_hidden_layers(config_or_num_hidden_layers)
    out = []
    for k in keys:
        m = _LAYER.match(k)
        if m and int(m.group(1)) >= L:
            out.append(k)
    return out


def _format_prefix(prefix: str | Callable[[int], str], i: int) -> str:
    return prefix(i) if callable(prefix) else prefix.format(i=i)


def mtp_key_to_local(key: str, num_hidden_layers: int, prefix: str | Callable[[int], str] = "mtp.{i}.") -> str | None:
    """``model.layers.{L+i}.rest`` -> ``prefix(i) + rest``; ``None`` for a key that is not MTP.

    ``prefix`` is a format string with ``{i}`` or a function of ``i``.
    """
    m = _LAYER.match(key)
    if not m or int(m.group(1)) < num_hidden_layers:
        return None
    return _format_prefix(prefix, int(m.group(1)) - num_hidden_layers) + m.group(2)


def _prefix_regex(prefix: str | Callable[[int], str]) -> re.Pattern:
    if callable(prefix):
        # recover the pattern from two samples: everything but the index must be fixed text
        a, b = prefix(0), prefix(1)
        i0 = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i0 is None or a[i0] != "0":
            raise ValueError(f"cannot invert MTP prefix function: prefix(0)={a!r}, prefix(1)={b!r}")
        head, tail = a[:i0], a[i0 + 1:]
    else:
        if prefix.count("{i}") != 1:
            raise ValueError(f"MTP prefix {prefix!r} must contain '{{i}}' exactly once")
        head, tail = prefix.split("{i}")
    return re.compile("^" + re.escape(head) + r"(\d+)" + re.escape(tail) + "(.*)$")


def local_key_to_mtp(key: str, num_hidden_layers: int, prefix: str | Callable[[int], str] = "mtp.{i}.") -> str | None:
    """Inverse of :func:`mtp_key_to_local`: ``prefix(i) + rest`` -> ``model.layers.{L+i}.rest``."""
    m = _prefix_regex(prefix).match(key)
    if not m:
        return None
    return f"model.layers.{num_hidden_layers + int(m.group(1))}.{m.group(2)}"


def split_mtp_state_dict(
    state_dict: Mapping[str, torch.Tensor], config_or_num_hidden_layers, prefix: str | Callable[[int], str] = "mtp.{i}."
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a checkpoint state dict into (main model, MTP modules renamed to ``prefix``)."""
    L = _num_hidden_layers(config_or_num_hidden_layers)
    main, mtp = {}, {}
    for k, v in state_dict.items():
        local = mtp_key_to_local(k, L, prefix)
        if local is None:
            main[k] = v
        else:
            mtp[local] = v
    return main, mtp


def merge_mtp_state_dict(
    main: Mapping[str, torch.Tensor],
    mtp: Mapping[str, torch.Tensor],
    config_or_num_hidden_layers,
    prefix: str | Callable[[int], str] = "mtp.{i}.",
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_mtp_state_dict` (``mtp`` may also be mixed into ``main``)."""
    L = _num_hidden_layers(config_or_num_hidden_layers)
    out = {}
    for k, v in list(main.items()) + list(mtp.items()):
        hf = local_key_to_mtp(k, L, prefix)
        out[hf if hf is not None else k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Expert layouts
# ---------------------------------------------------------------------------------------------


def _split_rows(t: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return t[..., :n, :], t[..., n:, :]


def split_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused routed experts -> one ``mlp.experts.{j}.{gate,up,down}_proj.weight`` per expert.

    FP8 tensors keep their scales (``gate_up_proj_scale_inv`` -> per-expert ``weight_scale_inv``);
    that needs the intermediate size to be a multiple of 128 so no scale block straddles gate and
    up. Other keys pass through in order.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.endswith(SCALE_SUFFIX) and _FUSED_EXPERTS.match(k[: -len(SCALE_SUFFIX)]):
            continue  # emitted with its weight
        m = _FUSED_EXPERTS.match(k)
        if m is None or v.dim() != 3:
            out[k] = v
            continue
        prefix, proj = m.group("prefix"), m.group("proj")
        scale = state_dict.get(k + SCALE_SUFFIX)
        if v.dtype == FP8_DTYPE and scale is None:
            raise ValueError(f"'{k}' is float8_e4m3fn but '{k}{SCALE_SUFFIX}' is missing")
        if proj == "gate_up_proj":
            inter = v.shape[1] // 2
            parts = dict(zip(("gate_proj", "up_proj"), _split_rows(v, inter)))
            if scale is not None:
                if inter % FP8_BLOCK:
                    raise ValueError(
                        f"cannot split FP8 '{k}' into per-expert gate/up weights: the intermediate "
                        f"size {inter} is not a multiple of {FP8_BLOCK}, so a scale block spans both; "
                        "save the high-precision weights with fp8=True instead"
                    )
                sparts = dict(zip(("gate_proj", "up_proj"), _split_rows(scale, inter // FP8_BLOCK)))
        else:
            parts = {"down_proj": v}
            sparts = {"down_proj": scale}
        for j in range(v.shape[0]):
            for name, t in parts.items():
                out[f"{prefix}.{j}.{name}.weight"] = t[j]
                if scale is not None:
                    out[f"{prefix}.{j}.{name}.weight{SCALE_SUFFIX}"] = sparts[name][j]
    return out


def fuse_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert ``mlp.experts.{j}.*_proj.weight`` -> fused ``gate_up_proj`` and ``down_proj``.

    FP8 per-expert weights with their ``weight_scale_inv`` fuse into e4m3 ``gate_up_proj`` /
    ``down_proj`` with ``gate_up_proj_scale_inv`` / ``down_proj_scale_inv`` (r1x.nn.MoEExperts'
    names); that needs the intermediate size to be a multiple of 128.
    """
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    scales: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    first_pos: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        is_scale = k.endswith(SCALE_SUFFIX)
        m = _SPLIT_EXPERT.match(k[: -len(SCALE_SUFFIX)] if is_scale else k)
        if m is None:
            out[k] = v
            continue
        prefix, j, proj = m.group("prefix"), int(m.group("j")), m.group("proj")
        if prefix not in first_pos:
            first_pos[prefix] = k
            out[k] = None  # placeholder keeps the original order
        (scales if is_scale else groups).setdefault(prefix, {}).setdefault(proj, {})[j] = v
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for prefix, projs in groups.items():
        sc = scales.get(prefix, {})
        n = max(max(d) for d in projs.values()) + 1
        for proj in ("gate_proj", "up_proj", "down_proj"):
            have = projs.get(proj, {})
            missing = [j for j in range(n) if j not in have]
            if missing:
                raise ValueError(f"routed experts under '{prefix}': {proj}.weight is missing for experts {missing}")
            if any(t.dtype == FP8_DTYPE for t in have.values()):
                sm = [j for j in range(n) if j not in sc.get(proj, {})]
                if sm:
                    raise ValueError(
                        f"'{prefix}.{sm[0]}.{proj}.weight' is float8_e4m3fn but "
                        f"'{prefix}.{sm[0]}.{proj}.weight{SCALE_SUFFIX}' is missing"
                    )
        gate = torch.stack([projs["gate_proj"][j] for j in range(n)])
        up = torch.stack([projs["up_proj"][j] for j in range(n)])
        down = torch.stack([projs["down_proj"][j] for j in range(n)])
        entry = {f"{prefix}.gate_up_proj": torch.cat([gate, up], dim=1), f"{prefix}.down_proj": down}
        if gate.dtype == FP8_DTYPE:
            if gate.shape[1] % FP8_BLOCK:
                raise ValueError(
                    f"cannot fuse FP8 experts under '{prefix}' without dequantizing: the intermediate "
                    f"size {gate.shape[1]} is not a multiple of {FP8_BLOCK}; load with dequantize=True "
                    "or fuse_experts=False"
                )
            sg = torch.stack([sc["gate_proj"][j] for j in range(n)])
            su = torch.stack([sc["up_proj"][j] for j in range(n)])
            entry[f"{prefix}.gate_up_proj{SCALE_SUFFIX}"] = torch.cat([sg, su], dim=1)
            entry[f"{prefix}.down_proj{SCALE_SUFFIX}"] = torch.stack([sc["down_proj"][j] for j in range(n)])
        fused[prefix] = entry
    result: dict[str, torch.Tensor] = {}
    pos_to_prefix = {v: p for p, v in first_pos.items()}
    for k, v in out.items():
        if k in pos_to_prefix:
            result.update(fused[pos_to_prefix[k]])
        else:
            result[k] = v
    return result


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_bytes: cannot parse {size!r} (use an int or e.g. '5GB', '500MiB')")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _storage_key(t: torch.Tensor):
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
    except (RuntimeError, NotImplementedError):
        return None


def _quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from r1x.ops.fp8 import quant_fp8_per_block

    if w.dim() == 2:
        return quant_fp8_per_block(w.contiguous(), FP8_BLOCK)
    qs = [quant_fp8_per_block(w[i].contiguous(), FP8_BLOCK) for i in range(w.shape[0])]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def save_state_dict(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config_dict: Mapping | None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    fp8: bool = False,
    split_routed_experts: bool = True,
) -> dict:
    """Write ``state_dict`` (HF names) and ``config_dict`` as an HF DeepseekV3 checkpoint in ``path``.

    Args:
        path: directory, created if needed; existing ``model-*.safetensors``, ``model.safetensors``
            and the index in it are replaced.
        state_dict: name -> tensor (any device; written contiguous, on CPU). Names whose tensor is
            the same storage view as an earlier name (tied weights such as ``lm_head.weight`` and
            ``model.embed_tokens.weight``) are written once; the aliases are recorded in the
            index metadata and restored by :func:`load_state_dict`.
        config_dict: a dict (or an object with ``to_dict()``), written as ``config.json`` (with ``quantization_config`` added when FP8
            tensors are written). ``None`` writes no config.
        max_shard_bytes: shard size limit (int bytes or a string like ``"5GB"``); one tensor
            larger than the limit gets a shard of its own.
        fp8: quantize the weights :func:`is_fp8_quantized_weight` selects to e4m3 with 128x128
            block scales (``<name>_scale_inv``). Tensors already in e4m3 are written as they are.
        split_routed_experts: write fused routed experts as DeepSeek's per-expert tensors.

    Returns:
        the index dict written to ``model.safetensors.index.json``.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    limit = _parse_size(max_shard_bytes)

    # 1. drop aliases (tied weights); record them so loading can restore them
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict['{k}'] is a {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise ValueError(f"state_dict['{k}'] is on the meta device and has no data to save")
        sk = _storage_key(v)
        if sk is not None and v.numel() > 0 and sk in seen:
            tied[k] = seen[sk]
            continue
        if sk is not None:
            seen[sk] = k
        tensors[k] = v

    if split_routed_experts:
        tensors = split_experts(tensors)

    # 2. quantize
    if fp8:
        quantized: dict[str, torch.Tensor] = {}
        for k, v in tensors.items():
            if (
                is_fp8_quantized_weight(k)
                and v.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and v.dim() in (2, 3)
            ):
                q, s = _quantize_block(v.detach())
                quantized[k] = q
                quantized[k + SCALE_SUFFIX] = s
            else:
                quantized[k] = v
        tensors = quantized
    has_fp8 = False
    for k, v in tensors.items():
        if v.dtype == FP8_DTYPE:
            has_fp8 = True
            if k + SCALE_SUFFIX not in tensors:
                raise ValueError(f"'{k}' is float8_e4m3fn but '{k}{SCALE_SUFFIX}' is missing from the state dict")

    # 3. shard (in the state dict's order, which keeps a layer's tensors together)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][k] = t
        sizes[-1] += nbytes

    # 4. write (remove stale shards first so a smaller checkpoint leaves no leftovers)
    for name in os.listdir(path):
        if name == SINGLE_FILE_NAME or name == INDEX_NAME or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
            os.remove(os.path.join(path, name))
    n = len(shards)
    weight_map: dict[str, str] = {}
    file_meta = {"format": "pt"}
    if tied:
        file_meta[TIED_METADATA_KEY] = json.dumps(tied, sort_keys=True)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=file_meta)
        for k in shard:
            weight_map[k] = fname
    metadata: dict = {"total_size": sum(sizes)}
    if tied:
        metadata[TIED_METADATA_KEY] = tied
    index = {"metadata": metadata, "weight_map": weight_map}
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")

    if config_dict is not None:
        cfg = dict(config_dict.to_dict() if hasattr(config_dict, "to_dict") else config_dict)
        if has_fp8:
            cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        else:
            qc = cfg.get("quantization_config")
            if isinstance(qc, Mapping) and qc.get("quant_method") == "fp8":
                cfg.pop("quantization_config")
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
    return index


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"config value of type {type(o).__name__} is not JSON serializable")


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


class LoadedCheckpoint(tuple):
    """``(state_dict, config_dict)``, plus ``.mtp_keys``: the keys of MTP modules that are present."""

    def __new__(cls, state_dict, config, mtp_keys):
        self = super().__new__(cls, (state_dict, config))
        self.mtp_keys = mtp_keys
        return self

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self[0]

    @property
    def config(self) -> dict:
        return self[1]

    @property
    def num_mtp_layers(self) -> int:
        """How many MTP modules have weights in the checkpoint (0 when the config only announces them)."""
        L = int(self.config.get("num_hidden_layers", 0))
        return len({int(_LAYER.match(k).group(1)) - L for k in self.mtp_keys})


def _config_dtype(cfg: Mapping) -> torch.dtype | None:
    name = cfg.get("torch_dtype", cfg.get("dtype"))
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(name, str) or name == "auto":
        return None
    dt = getattr(torch, name.removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) else None


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return dt


def load_state_dict(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    dequantize: bool = True,
    fuse_routed_experts: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Read an HF DeepseekV3 checkpoint directory (or a single ``.safetensors`` file).

    Args:
        path: a directory with ``model.safetensors.index.json`` and its shards, or with
            ``model.safetensors``; or the path of one ``.safetensors`` file.
        dtype: floating tensors are converted to it (the router gate and its bias stay float32,
            as in transformers); by default tensors keep their stored dtype and dequantized FP8
            weights take the config's ``torch_dtype``/``dtype`` (bfloat16 if it names none).
        dequantize: turn each e4m3 weight and its ``_scale_inv`` back into a high-precision
            weight (``r1x.dequant_fp8`` with 128x128 blocks). ``False`` returns them as stored.
        fuse_routed_experts: fuse per-expert routed weights into ``mlp.experts.gate_up_proj`` /
            ``down_proj`` (the in-memory layout); FP8 scales fuse into ``*_scale_inv``.
        device: where the tensors are loaded.

    Returns:
        :class:`LoadedCheckpoint`, which unpacks as ``(state_dict, config_dict)`` and has
        ``.mtp_keys`` (keys ``model.layers.{n}.*`` with ``n >= num_hidden_layers``). A config
        without a ``config.json`` is ``{}``. Tied weights missing from the files
        (``lm_head.weight`` with ``tie_word_embeddings``) are restored as the same tensor.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: '{path}' does not exist")
    if os.path.isfile(path):
        directory, files, weight_map, tied = os.path.dirname(path), [path], None, {}
    else:
        directory = path
        index_path = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, SINGLE_FILE_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                try:
                    index = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"'{index_path}' is not valid JSON: {e}") from None
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"'{index_path}' has no 'weight_map'")
            tied = dict((index.get("metadata") or {}).get(TIED_METADATA_KEY) or {})
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
            if missing:
                raise FileNotFoundError(
                    f"'{index_path}' lists shard(s) that are missing from '{path}': {', '.join(missing)}"
                )
            files = [os.path.join(path, n) for n in names]
        elif os.path.isfile(single):
            files, weight_map, tied = [single], None, {}
        else:
            raise FileNotFoundError(
                f"no checkpoint in '{path}': expected '{INDEX_NAME}' (sharded) or '{SINGLE_FILE_NAME}'"
            )

    config: dict = {}
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)

    sd: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    dev = str(device)
    for file in files:
        with safe_open(file, framework="pt", device=dev) as f:
            meta = f.metadata() or {}
            if TIED_METADATA_KEY in meta and not tied:
                tied = json.loads(meta[TIED_METADATA_KEY])
            keys = list(f.keys())
            if weight_map is not None:
                base = os.path.basename(file)
                listed = [k for k, v in weight_map.items() if v == base]
                absent = [k for k in listed if k not in set(keys)]
                if absent:
                    raise KeyError(f"'{file}' lacks tensor(s) the index maps to it: {', '.join(absent[:5])}")
                keys = listed
            for k in keys:
                sd[k] = f.get_tensor(k)
                where[k] = file

    # FP8 weights and their scales
    for k in list(sd):
        if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] not in sd:
            raise KeyError(f"scale '{k}' (in '{where[k]}') has no weight '{k[: -len(SCALE_SUFFIX)]}'")
        if sd[k].dtype == FP8_DTYPE and k + SCALE_SUFFIX not in sd:
            raise KeyError(
                f"weight '{k}' (in '{where[k]}') is float8_e4m3fn but its scale '{k}{SCALE_SUFFIX}' is "
                "missing from the checkpoint"
            )
    target = _resolve_dtype(dtype)
    if dequantize:
        from r1x.ops.fp8 import dequant_fp8

        deq_dtype = target or _config_dtype(config) or torch.bfloat16
        out: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if k.endswith(SCALE_SUFFIX) and sd[k[: -len(SCALE_SUFFIX)]].dtype == FP8_DTYPE:
                continue
            if v.dtype == FP8_DTYPE:
                s = sd[k + SCALE_SUFFIX].to(torch.float32)
                if v.dim() < 2:
                    raise ValueError(f"FP8 weight '{k}' must be at least 2-D, got shape {list(v.shape)}")
                try:
                    w = dequant_fp8(v.contiguous(), s.contiguous(), (FP8_BLOCK, FP8_BLOCK))
                except RuntimeError as e:
                    raise ValueError(f"cannot dequantize '{k}' (in '{where[k]}') with its scale: {e}") from None
                v = w.to(deq_dtype)
            out[k] = v
        sd = out
        if isinstance(config.get("quantization_config"), Mapping) and config["quantization_config"].get("quant_method") == "fp8":
            config = dict(config)
            config.pop("quantization_config")
    if target is not None:
        for k, v in sd.items():
            if v.is_floating_point() and v.dtype != FP8_DTYPE and not (k.endswith(SCALE_SUFFIX)):
                want = torch.float32 if _KEEP_FP32.search(k) else target
                if v.dtype != want:
                    sd[k] = v.to(want)

    if fuse_routed_experts:
        sd = fuse_experts(sd)

    # tied weights: recorded aliases, then the config's tie_word_embeddings
    for alias, src in tied.items():
        if alias not in sd and src in sd:
            sd[alias] = sd[src]
    if config.get("tie_word_embeddings") and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]

    found_mtp = mtp_keys(sd, config) if "num_hidden_layers" in config else []
    announced = int(config.get("num_nextn_predict_layers", 0) or 0)
    if found_mtp:
        logger.info("checkpoint %s: %d MTP tensors (layers >= %s)", path, len(found_mtp), config["num_hidden_layers"])
    elif announced:
        logger.info("checkpoint %s: config announces %d MTP layer(s) but has no MTP weights", path, announced)
    return LoadedCheckpoint(sd, config, found_mtp)
