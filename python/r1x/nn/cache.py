"""A paged latent KV cache for MLA decode (the layout :func:`r1x.mla_decode` reads).

MLA caches one row per token and layer, shared by all heads: the normalised KV latent ``c_kv``
(``kv_lora_rank`` wide) followed by the rotated RoPE key ``k_pe`` (``qk_rope_head_dim``):
512 + 64 = 576 elements per token and layer for DeepSeek-V3, against 128 * (192 + 128) =
40,960 for full multi-head K and V. The rows live in fixed-size blocks of one preallocated
tensor, and each sequence owns a list of blocks (its block table), so sequences grow, shrink
and end without copying or fragmenting memory (vLLM's PagedAttention, FlashMLA's layout)::

    cache = PagedLatentCache(num_blocks=1024, block_size=64, dim=512 + 64, num_layers=61,
                             dtype=torch.bfloat16, device="cuda")
    cache.add(7)                                    # a new sequence, id 7
    cache.append(layer, [7], latents)               # latents [1, n, 576]: written, length += n
    table = cache.block_table([7, 3])               # [2, max_blocks] int32
    lens = cache.seqlens([7, 3], layer)             # [2] int32
    cache.truncate(7, 100)                          # roll back (speculative decoding)
    cache.free(7)                                   # its blocks go back to the free list

Lengths are kept per layer: each layer appends after its own last token, so one step of an
L-layer model appends once per layer and no layer can overwrite another step's tokens. Blocks
are allocated when the first layer needs them (all layers share a sequence's block table);
:meth:`reserve` allocates ahead, e.g. to admit a request only if its whole step fits.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["PagedLatentCache", "OutOfBlocksError"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class OutOfBlocksError(RuntimeError):
    """:class:`PagedLatentCache` has too few free blocks for a request (nothing was changed:
    free or truncate sequences, or preempt one, and retry)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PagedLatentCache:
    """Paged storage of MLA latents for many sequences and layers.

    Args:
        num_blocks: blocks in the pool (shared by all sequences).
        block_size: tokens per block, any value >= 1 (FlashMLA's CUDA kernel prefers 64).
        dim: elements per token and layer, ``kv_lora_rank + qk_rope_head_dim``.
        num_layers: layers sharing the block tables (one block id addresses the same slots of
            every layer).
        dtype: float32, bfloat16 or float16: the dtype of the MLA layers that use it
            (:func:`r1x.mla_decode` takes the cache in its query's dtype). Default: torch's
            default dtype.
        device: where the storage lives; block tables and lengths are made there too.

    Attributes:
        kv: the storage, ``[num_layers, num_blocks, block_size, dim]``; ``kv[layer]`` is the
            ``kv_cache`` argument of :func:`r1x.mla_decode`. Unwritten slots hold whatever
            ``torch.empty`` gave (they are never read).

    Sequences are identified by integer ids chosen by the caller. Every method validates its
    arguments and raises ``ValueError`` naming the argument (``TypeError`` for a wrong type),
    or :class:`OutOfBlocksError` when the free blocks do not suffice; a method that raises
    changes nothing.
    """

    def __init__(self, num_blocks: int, block_size: int, dim: int, num_layers: int = 1,
                 dtype: torch.dtype | None = None, device=None):
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size), ("dim", dim),
                        ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PagedLatentCache: `{name}` must be a positive integer, got {v!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise ValueError(f"PagedLatentCache: `dtype` must be torch.float32, torch.bfloat16 or "
                             f"torch.float16 (mla_decode's dtypes), got {dtype}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dim = dim
        self.num_layers = num_layers
        self.kv = torch.empty(num_layers, num_blocks, block_size, dim, dtype=dtype, device=device)
        self._free: list[int] = []
        self._blocks: dict[int, list[int]] = {}
        self._lens: dict[int, list[int]] = {}  # seq id -> tokens written, per layer
        self._version = 0  # bumped whenever any block table changes
        self._table_memo = None
        self._lens_memo = None
        self.reset()

    # ------------------------------------------------------------------------------------------
    # properties
    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free)

    @property
    def free_blocks(self) -> list[int]:
        """The free block ids (a copy), the next to be allocated last."""
        return list(self._free)

    @property
    def sequences(self) -> list[int]:
        """The ids of the sequences in the cache, in the order they were added."""
        return list(self._blocks)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers: ``num_layers * dim * element size``."""
        return self.num_layers * self.dim * self.kv.element_size()

    def __repr__(self) -> str:
        return (f"PagedLatentCache(num_blocks={self.num_blocks}, block_size={self.block_size}, dim={self.dim}, "
                f"num_layers={self.num_layers}, dtype={self.dtype}, device={self.device}, "
                f"sequences={len(self)}, free_blocks={self.num_free_blocks})")

    # ------------------------------------------------------------------------------------------
    # sequences
    def reset(self) -> None:
        """Drop every sequence; all blocks become free (allocated from block 0 upwards)."""
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._blocks.clear()
        self._lens.clear()
        self._changed()

    def add(self, seq_id: int) -> None:
        """Start an empty sequence ``seq_id`` (no block is taken until it gets tokens)."""
        seq_id = self._as_id("add", "seq_id", seq_id)
        if seq_id in self._blocks:
            raise ValueError(f"PagedLatentCache.add: `seq_id` {seq_id} is already in the cache")
        self._blocks[seq_id] = []
        self._lens[seq_id] = [0] * self.num_layers

    def free(self, seq_id: int) -> None:
        """End sequence ``seq_id``: its blocks return to the free list."""
        seq_id = self._known("free", "seq_id", seq_id)
        self._release(self._blocks.pop(seq_id))
        del self._lens[seq_id]
        self._changed()

    def length(self, seq_id: int, layer: int | None = None) -> int:
        """Tokens of ``seq_id`` in ``layer`` (default: the most over all layers)."""
        seq_id = self._known("length", "seq_id", seq_id)
        lens = self._lens[seq_id]
        return max(lens) if layer is None else lens[self._layer("length", layer)]

    def blocks(self, seq_id: int) -> list[int]:
        """The block ids of ``seq_id`` in token order (a copy)."""
        return list(self._blocks[self._known("blocks", "seq_id", seq_id)])

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``seq_id`` in every layer (speculative decoding:
        drop the rejected draft tokens); blocks past them, reserved ones included, are freed."""
        seq_id = self._known("truncate", "seq_id", seq_id)
        cur = max(self._lens[seq_id])
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= cur:
            raise ValueError(f"PagedLatentCache.truncate: `length` must be an integer in [0, {cur}] (the "
                             f"tokens of sequence {seq_id}), got {length!r}")
        self._lens[seq_id] = [min(n, length) for n in self._lens[seq_id]]
        blocks = self._blocks[seq_id]
        keep = _ceil_div(length, self.block_size)
        if keep < len(blocks):
            self._release(blocks[keep:])
            del blocks[keep:]
            self._changed()

    def blocks_needed(self, seq_ids, num_tokens: int) -> int:
        """Free blocks that :meth:`reserve` ``(seq_ids, num_tokens)`` would take."""
        ids = self._ids("blocks_needed", seq_ids)
        n = self._count("blocks_needed", "num_tokens", num_tokens)
        return sum(self._shortfall(s, max(self._lens[s]) + n) for s in ids)

    def reserve(self, seq_ids, num_tokens: int) -> None:
        """Make room for ``num_tokens`` more tokens in each of ``seq_ids`` (beyond its longest
        layer) without writing anything: later appends of that many tokens cannot run out of
        blocks. Raises :class:`OutOfBlocksError` (taking nothing) when the free blocks fall short."""
        ids = self._ids("reserve", seq_ids)
        n = self._count("reserve", "num_tokens", num_tokens)
        self._grow("reserve", {s: max(self._lens[s]) + n for s in ids})

    # ------------------------------------------------------------------------------------------
    # writing and reading
    def append(self, layer: int, seq_ids, latents: torch.Tensor, cu_seqlens=None) -> None:
        """Write new tokens' latents into ``layer`` after each sequence's last token there, and
        advance that layer's lengths; blocks are allocated as needed (all or nothing).

        Args:
            layer: the layer index, ``0 <= layer < num_layers``.
            seq_ids: the B sequence ids (distinct, each added before).
            latents: ``[B, n, dim]`` (n new tokens for every sequence), or packed ``[T, dim]``
                with ``cu_seqlens``; the cache's dtype and device. Written without autograd.
            cu_seqlens: with packed latents, ``[B + 1]`` cumulative token counts (a tensor or a
                list; read on the host), rows ``cu_seqlens[b]:cu_seqlens[b+1]`` for ``seq_ids[b]``.
        """
        op = "append"
        layer = self._layer(op, layer)
        ids = self._ids(op, seq_ids)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"PagedLatentCache.append: `latents` must be a tensor, got {type(latents).__name__}")
        if latents.dtype != self.dtype:
            raise ValueError(f"PagedLatentCache.append: `latents` must have the cache's dtype {self.dtype}, "
                             f"got {latents.dtype}")
        if latents.device != self.device:
            raise ValueError(f"PagedLatentCache.append: `latents` must be on the cache's device {self.device}, "
                             f"got {latents.device}")
        b = len(ids)
        if cu_seqlens is None:
            if latents.dim() != 3 or latents.shape[0] != b or latents.shape[2] != self.dim:
                raise ValueError(f"PagedLatentCache.append: `latents` must be [B = {b} (len(seq_ids)), n, "
                                 f"dim = {self.dim}] (or packed [T, {self.dim}] with `cu_seqlens`), got shape "
                                 f"{list(latents.shape)}")
            counts = [latents.shape[1]] * b
            rows = latents.reshape(-1, self.dim)
        else:
            if latents.dim() != 2 or latents.shape[1] != self.dim:
                raise ValueError(f"PagedLatentCache.append: packed `latents` must be [T, dim = {self.dim}], got "
                                 f"shape {list(latents.shape)}")
            counts = self._counts_from_cu(op, cu_seqlens, b, latents.shape[0])
            rows = latents
        starts = [self._lens[s][layer] for s in ids]
        self._grow(op, {s: st + n for s, st, n in zip(ids, starts, counts)})
        if rows.shape[0]:
            idx = self._slots(ids, starts, counts)
            with torch.no_grad():
                self.kv[layer].view(-1, self.dim).index_copy_(0, idx, rows.detach())
        for s, st, n in zip(ids, starts, counts):
            self._lens[s][layer] = st + n

    def block_table(self, seq_ids, max_blocks: int | None = None) -> torch.Tensor:
        """``[B, max_blocks]`` int32 on the cache's device: row b lists the blocks of
        ``seq_ids[b]`` in token order, padded with block 0 (never read: the lengths bound the
        reads). ``max_blocks`` defaults to the longest list (at least 1); pass a fixed width
        for static shapes (CUDA graphs)."""
        ids = self._ids("block_table", seq_ids)
        need = max([len(self._blocks[s]) for s in ids], default=0)
        if max_blocks is None:
            width = max(need, 1)
        elif not isinstance(max_blocks, int) or isinstance(max_blocks, bool) or max_blocks < max(need, 1):
            raise ValueError(f"PagedLatentCache.block_table: `max_blocks` must be an integer >= {max(need, 1)} "
                             f"(the most blocks a sequence holds), got {max_blocks!r}")
        else:
            width = max_blocks
        key = (tuple(ids), width, self._version)
        if self._table_memo is None or self._table_memo[0] != key:
            rows = [self._blocks[s] + [0] * (width - len(self._blocks[s])) for s in ids]
            table = torch.tensor(rows, dtype=torch.int32).reshape(len(ids), width)
            self._table_memo = (key, table.to(self.device))
        return self._table_memo[1]

    def seqlens(self, seq_ids, layer: int = 0) -> torch.Tensor:
        """``[B]`` int32 on the cache's device: the tokens of each of ``seq_ids`` in ``layer``
        (``cache_seqlens`` of :func:`r1x.mla_decode`)."""
        layer = self._layer("seqlens", layer)
        ids = self._ids("seqlens", seq_ids)
        lens = tuple(self._lens[s][layer] for s in ids)
        key = (tuple(ids), lens)
        if self._lens_memo is None or self._lens_memo[0] != key:
            self._lens_memo = (key, torch.tensor(lens, dtype=torch.int32).to(self.device))
        return self._lens_memo[1]

    # ------------------------------------------------------------------------------------------
    # internals
    def _changed(self) -> None:
        self._version += 1

    def _release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def _shortfall(self, seq_id: int, tokens: int) -> int:
        return max(_ceil_div(tokens, self.block_size) - len(self._blocks[seq_id]), 0)

    def _grow(self, op: str, targets: dict) -> None:
        """Give each sequence blocks for ``targets[seq]`` tokens, or raise taking none."""
        need = {s: self._shortfall(s, t) for s, t in targets.items()}
        total = sum(need.values())
        if total > len(self._free):
            raise OutOfBlocksError(
                f"PagedLatentCache.{op}: out of blocks: the sequences {list(targets)} need {total} more "
                f"block(s) of {self.block_size} tokens, {len(self._free)} of `num_blocks` = {self.num_blocks} "
                f"are free; free or truncate sequences (or build the cache with more blocks)")
        for s, k in need.items():
            if k:
                self._blocks[s].extend(self._free.pop() for _ in range(k))
        if total:
            self._changed()

    def _slots(self, ids, starts, counts) -> torch.Tensor:
        """Flat row indices (``block * block_size + offset``) of the new tokens, in order."""
        bs = self.block_size
        if sum(counts) <= 256:  # decode steps: plain ints beat three tensor ops per sequence
            slots = [self._blocks[s][j // bs] * bs + j % bs
                     for s, st, n in zip(ids, starts, counts) for j in range(st, st + n)]
            return torch.tensor(slots, dtype=torch.int64, device=self.device)
        parts = []
        for s, st, n in zip(ids, starts, counts):
            if n:
                j = torch.arange(st, st + n)
                blocks = torch.tensor(self._blocks[s], dtype=torch.int64)
                parts.append(blocks[j // bs] * bs + j % bs)
        return torch.cat(parts).to(self.device)

    def _counts_from_cu(self, op, cu_seqlens, b, t) -> list[int]:
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
                raise ValueError(f"PagedLatentCache.{op}: `cu_seqlens` must be a 1-D integer tensor, got "
                                 f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}")
            cu = cu_seqlens.tolist()
        else:
            cu = [operator.index(c) for c in cu_seqlens]
        if len(cu) != b + 1 or cu[0] != 0 or cu[-1] != t or any(y < x for x, y in zip(cu, cu[1:])):
            raise ValueError(f"PagedLatentCache.{op}: `cu_seqlens` must be B + 1 = {b + 1} nondecreasing offsets "
                             f"from 0 to T = {t} (the rows of `latents`), got {cu}")
        return [y - x for x, y in zip(cu, cu[1:])]

    def _as_id(self, op, name, seq_id) -> int:
        try:
            if isinstance(seq_id, bool):
                raise TypeError
            return operator.index(seq_id)
        except TypeError:
            raise TypeError(f"PagedLatentCache.{op}: `{name}` must be an integer sequence id, got {seq_id!r}") from None

    def _known(self, op, name, seq_id) -> int:
        seq_id = self._as_id(op, name, seq_id)
        if seq_id not in self._blocks:
            raise ValueError(f"PagedLatentCache.{op}: `{name}` {seq_id} is not in the cache (add it first)")
        return seq_id

    def _ids(self, op, seq_ids) -> list[int]:
        if isinstance(seq_ids, (int, str, bytes)) or (isinstance(seq_ids, torch.Tensor) and seq_ids.dim() != 1):
            raise TypeError(f"PagedLatentCache.{op}: `seq_ids` must be a list of sequence ids, got {seq_ids!r}")
        try:
            ids = [self._known(op, "seq_ids", s) for s in seq_ids]
        except TypeError:
            raise TypeError(f"PagedLatentCache.{op}: `seq_ids` must be a list of integer sequence ids, "
                            f"got {seq_ids!r}") from None
        if len(set(ids)) != len(ids):
            raise ValueError(f"PagedLatentCache.{op}: `seq_ids` must be distinct, got {ids}")
        return ids

    def _layer(self, op, layer) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"PagedLatentCache.{op}: `layer` must be an integer in [0, num_layers = "
                             f"{self.num_layers}), got {layer!r}")
        return layer

    @staticmethod
    def _count(op, name, n) -> int:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"PagedLatentCache.{op}: `{name}` must be an integer >= 0, got {n!r}")
        return n
