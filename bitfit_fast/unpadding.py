"""Which tokens of a batch exist, and attention over them alone.

A padded batch [B, T, d] with a padding mask (what every Hugging Face collator produces) becomes [N, d] rows of
real tokens, sequence after sequence; so does a packed one (Hugging Face's ``DataCollatorWithFlattening``: one row
of concatenated sequences whose ``position_ids`` restart at 0, the convention of its flash-attention path). Every
GEMM, LayerNorm, activation, dropout and bias-gradient sum then runs on real tokens only, and the output is
scattered back to the padded shape once, with zeros at the padding (as flash-attention's BERT does).

Attention is the one op that needs the sequences apart. It runs on the real tokens laid out as [S, L] (S
sequences, L the longest in the batch) with a key-padding mask, through ``scaled_dot_product_attention`` (on CPU
with dropout, the same math in torch ops with a faster mask draw: ``torch_ops.dropout_attention``), at a cost of
O(S·L²) scores, which for L ≤ 512 is a few percent of the GEMMs that unpadding saves. torch's variable-length
alternatives do not serve both: ``varlen_attn`` is CUDA-only flash attention without dropout, and nested-tensor
SDPA on CPU loops over the sequences in the math kernel (slower than one padded call).
"""

import torch
import torch.nn.functional as F

from . import task_rows
from .torch_ops import DropoutAttentionFunction, dropout_attention


class _ScatterRows(torch.autograd.Function):
    """rows x [N, ...] placed at ``index`` of a zero tensor [total, ...]. Unlike ``index_copy``, whose
    autograd keeps the source, it keeps only the index: its backward is a gather."""

    @staticmethod
    def forward(ctx, x, index, total):
        ctx.save_for_backward(index)
        return x.new_zeros(total, *x.shape[1:]).index_copy_(0, index, x)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class _HeadViews(torch.autograd.Function):
    """x [S, L, P * H * D] as P tensors [S, H, L, D] (attention's layout): views, no copy. Its backward writes
    each gradient into its place of one [S, L, P * H * D] buffer, one pass; autograd's backward of slicing the
    projections apart and splitting the heads zero-fills a full-width buffer per slice, copies into it and sums
    them (measured on an H200: 4 to 5 ms of a 56 ms BERT-base step)."""

    @staticmethod
    def forward(ctx, x, parts, heads):
        ctx.parts = parts
        sequences, length, width = x.shape
        return x.view(sequences, length, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        first = next(g for g in grads if g is not None)
        sequences, heads, length, dim = first.shape
        grad = first.new_empty(sequences, length, ctx.parts, heads, dim)
        for part, g in enumerate(grads):
            if g is None:
                grad[:, :, part].zero_()
            else:
                grad[:, :, part].copy_(g.transpose(1, 2))
        return grad.view(sequences, length, -1), None, None


def key_padding(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor | None:
    """[B, T] True where a token exists, if the attention ``mask`` (boolean, or additive with 0 where allowed;
    [B, 1, T, T] or [B, 1, 1, T]) lets every query see exactly the existing keys; None for any other mask."""
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[-1] != seq:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    valid = allowed.all(dim=2).squeeze(1)  # a key some real query may not see is not a real key
    # Hugging Face lets padding queries see every key (no all-masked row): those rows are not checked.
    rows = allowed[:, 0][valid] if allowed.shape[2] > 1 else allowed[:, 0, 0]
    expected = valid.unsqueeze(1).expand(-1, allowed.shape[2], -1)[valid] if allowed.shape[2] > 1 else valid
    return valid if torch.equal(rows, expected) else None


# Devices on which the rows are bucketed (see ``bucketed``); the tests add "cpu" to run that path there.
BUCKETED_DEVICES = {"cuda"}


def bucketed(rows: int) -> int:
    """``rows`` rounded up to a multiple of 1/16 of the largest power of two not above it, and of 64: from 1,024
    rows on at most 6.25% more (below, at most 63 more), and about 16 distinct sizes per doubling. Real text
    gives every batch another token count, and cuBLAS pays for each GEMM shape it has not seen: on an H200 a
    BERT-base step on real BBC lengths spent ~2.4x the host time per GEMM of a fixed-length one
    (benches/results/gpu/profile.txt, aten::mm 174 vs 71 us) and left the GPU idle a quarter of the step."""
    step = max(64, (1 << (rows.bit_length() - 1)) // 16)
    return -(-rows // step) * step


class Tokens:
    """The layout of one batch's real tokens: built once per forward and shared by every layer (never cached
    across forwards). ``pack``/``unpack`` move hidden states between the batch's shape and [N, d] rows;
    ``attention`` runs over the rows, sequence by sequence. On a GPU the rows are ``bucketed``: zero rows after
    the N real ones, which no output reads, so their gradients are exactly zero and add nothing to any bias's."""

    def __init__(self, batch_shape, rows, slots, starts, max_len, key_mask):
        self.batch_shape = batch_shape  # (B, T) of the hidden states
        self.rows = rows  # [N] real tokens' indices in the flattened [B·T]; None: every token is real
        self.slots = slots  # [N] their places in the [S·L] attention layout; None: rows laid out as [S, L]
        self.starts = starts  # [S] each sequence's first row
        self.max_len = max_len  # L
        self.key_mask = key_mask  # [S, 1, 1, L] True where a key exists (or any attention mask); None: all exist
        index = rows if rows is not None else slots
        self.real_rows = index.shape[0] if index is not None else batch_shape[0] * batch_shape[1]  # N
        self.num_rows = bucketed(self.real_rows) if starts.device.type in BUCKETED_DEVICES else self.real_rows
        self._additive_masks = {}
        self._row_tasks = {}

    @property
    def num_sequences(self) -> int:
        """S, the number of sequences."""
        return self.starts.shape[0]

    @classmethod
    def of_batch(cls, hidden: torch.Tensor, attention_mask=None, position_ids=None, cu_seq_lens=None) -> "Tokens":
        """The layout for a [B, T, d] batch and the mask its layers receive. Packed sequences in a batch of one
        row are recognised by ``position_ids`` restarting at 0, or by flash-attention's ``cu_seq_lens`` (what
        ``DataCollatorWithFlattening`` returns); a mask that is not a key-padding mask, or a batch whose first
        token is padding (left padding: the head would read a padding token), is kept as it is."""
        batch, seq = hidden.shape[:2]
        device = hidden.device
        if attention_mask is not None and attention_mask.dim() == 2:
            # Hugging Face passes the 0/1 padding mask itself to a flash-attention model's layers.
            attention_mask = attention_mask.bool()[:, None, None, :]
        if attention_mask is not None:
            valid = key_padding(attention_mask, batch, seq)
            if valid is None or not bool(valid[:, 0].all()):
                return cls((batch, seq), None, None, torch.arange(batch, device=device) * seq, seq, attention_mask)
            if bool(valid.all()):
                attention_mask = None
        if attention_mask is None:
            if batch == 1 and cu_seq_lens is not None:
                return cls.packed(seq, cu_seq_lens[:-1].to(device=device, dtype=torch.long))
            if batch == 1 and position_ids is not None:
                starts = (position_ids.reshape(-1) == 0).nonzero().squeeze(1)
                if starts.numel() > 1 and int(starts[0]) == 0:
                    return cls.packed(seq, starts)
            return cls((batch, seq), None, None, torch.arange(batch, device=device) * seq, seq, None)
        lengths = valid.sum(dim=1)
        max_len = int(lengths.max())
        rows = valid.reshape(-1).nonzero().squeeze(1)
        place = valid.cumsum(dim=1) - 1 + torch.arange(batch, device=device).unsqueeze(1) * max_len
        starts = torch.cumsum(lengths, 0) - lengths
        key_mask = (torch.arange(max_len, device=device) < lengths.unsqueeze(1))[:, None, None, :]
        return cls((batch, seq), rows, place.reshape(-1)[rows], starts, max_len, key_mask)

    @classmethod
    def packed(cls, total: int, starts: torch.Tensor) -> "Tokens":
        """One row of ``total`` tokens holding sequences that begin at ``starts``."""
        device = starts.device
        lengths = torch.diff(starts, append=torch.tensor([total], device=device))
        max_len = int(lengths.max())
        sequence = torch.repeat_interleave(torch.arange(starts.shape[0], device=device), lengths)
        slots = torch.arange(total, device=device) - starts[sequence] + sequence * max_len
        key_mask = (torch.arange(max_len, device=device) < lengths.unsqueeze(1))[:, None, None, :]
        return cls((1, total), None, slots, starts, max_len, key_mask)

    @property
    def one_sequence_per_row(self) -> bool:
        """Whether each batch row holds one sequence that starts at its first position, where a classification
        head reads it, and attention has no mask other than key padding (then each sequence's first row may run
        the last layer alone: the classification shortcut)."""
        masked_queries = self.key_mask is not None and self.key_mask.shape[2] > 1
        return self.num_sequences == self.batch_shape[0] and not masked_queries

    def row_tasks(self, first_only: bool = False) -> torch.Tensor | None:
        """Each row's task in a TaskBank's mixed batch (see ``task_rows``): [N], or [S] for the rows of each
        sequence's first token; None outside one. Made once a forward, and kept for the backward's recomputations
        (memory modes that recompute run after the bank's forward has returned)."""
        if first_only in self._row_tasks:
            return self._row_tasks[first_only]
        tasks = task_rows.current()
        if tasks is None:
            return None
        batch, seq = self.batch_shape
        task_rows.check_batch_size(tasks, batch)
        tasks = tasks.to(self.starts.device)
        if first_only:
            self._row_tasks[first_only] = tasks  # one sequence per batch row: S = B
        else:
            rows = self.rows if self.rows is not None else torch.arange(batch * seq, device=tasks.device)
            tasks = tasks.index_select(0, torch.div(rows, seq, rounding_mode="floor"))
            self._row_tasks[first_only] = self._to_bucket(tasks)  # the bucket's extra rows: task 0, gradient 0
        return self._row_tasks[first_only]

    def _to_bucket(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] real rows → [num_rows, ...], zeros after them."""
        extra = self.num_rows - self.real_rows
        return x if extra == 0 else torch.cat([x, x.new_zeros(extra, *x.shape[1:])])

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        """The real rows of [num_rows, ...] rows."""
        return x if x.shape[0] == self.real_rows else x[: self.real_rows]

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, d] → [num_rows, d]: the N real tokens, then the bucket's zero rows."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return self._to_bucket(flat if self.rows is None else flat.index_select(0, self.rows))

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[num_rows, d] → [B, T, d], zeros at padding."""
        batch, seq = self.batch_shape
        x = self._real(x)
        if self.rows is not None:
            x = _ScatterRows.apply(x, self.rows, batch * seq)
        return x.view(batch, seq, x.shape[-1])

    def _to_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """[num_rows, ...] rows → [S, L, ...], zeros where a sequence is shorter than L."""
        x = self._real(x)
        if self.slots is not None:
            x = _ScatterRows.apply(x, self.slots, self.num_sequences * self.max_len)
        return x.view(self.num_sequences, self.max_len, *x.shape[1:])

    def _from_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """[S, L, ...] → [num_rows, ...] rows."""
        x = x.reshape(self.num_sequences * self.max_len, *x.shape[2:])
        return self._to_bucket(x if self.slots is None else x.index_select(0, self.slots))

    def additive_mask(self, dtype: torch.dtype, window: int | None = None) -> torch.Tensor | None:
        """The key mask as 0 / dtype's lowest, for attention that adds it to the scores; made once a forward.
        With ``window``, keys farther than that from the query (positions within the sequence, or within the
        batch row when the mask is kept as it came) are masked too: a bidirectional sliding window."""
        mask = self.key_mask
        if window is None and (mask is None or mask.dtype != torch.bool):
            return mask if mask is None else mask.to(dtype)
        if (dtype, window) not in self._additive_masks:
            allowed = mask if mask is None or mask.dtype == torch.bool else mask == 0
            if window is not None:
                position = torch.arange(self.max_len, device=self.starts.device)
                near = (position[:, None] - position[None, :]).abs() <= window
                allowed = near if allowed is None else allowed & near
            additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._additive_masks[dtype, window] = additive.masked_fill_(~allowed, torch.finfo(dtype).min)
        return self._additive_masks[dtype, window]

    def attention(self, q, kv, heads: int, dropout_p: float, seed: int | None, scale: float,
                  keep_probabilities: bool, first_only: bool = False, window: int | None = None) -> torch.Tensor:
        """softmax(q k^T · scale + mask) v per sequence, for query rows q [N, d] (with ``first_only``, [S, d]: each
        sequence's first row) and key-value rows kv [N, 2d] (k then v); returns q's shape. See :meth:`attend`
        (BERT's layers split their QKV GEMM's output into heads themselves: ``functions.LinearHeadsFunction``)."""
        k, v = _HeadViews.apply(self._to_sequences(kv), 2, heads)
        return self.attend(self.query_heads(q, heads, first_only), k, v, dropout_p, seed, scale, keep_probabilities,
                           first_only, window)

    def query_heads(self, q: torch.Tensor, heads: int, first_only: bool = False) -> torch.Tensor:
        """Query rows [N, d] (with ``first_only``, [S, d]) as [S, H, L, D] (L = 1 with ``first_only``)."""
        q = q.unsqueeze(1) if first_only else self._to_sequences(q)
        return q.view(self.num_sequences, -1, heads, q.shape[-1] // heads).transpose(1, 2)

    def attend(self, q, k, v, dropout_p: float, seed: int | None, scale: float, keep_probabilities: bool,
               first_only: bool = False, window: int | None = None) -> torch.Tensor:
        """softmax(q k^T · scale + mask) v for q, k, v [S, H, L, D] in the attention layout (q with L = 1 and
        ``first_only``: each sequence's first row); returns rows [N, H·D], or [S, H·D] with ``first_only``.
        ``keep_probabilities=False`` runs the flash-style ``DropoutAttentionFunction``, which keeps q, k, v and the
        row logsumexp, not the probabilities; otherwise SDPA runs, or on CPU with dropout ``dropout_attention``.
        ``window``: each query sees the keys at most that many positions away (see ``additive_mask``)."""
        mask = self.additive_mask(k.dtype, window)
        if first_only and mask is not None:
            mask = mask[..., :1, :]  # a window's [L, L] mask: the first query's row
        if not keep_probabilities and dropout_p > 0.0:
            context = DropoutAttentionFunction.apply(q, k, v, mask, dropout_p, seed, scale)
        elif dropout_p > 0.0 and q.device.type == "cpu":  # SDPA's CPU path: dropout drawn by bernoulli_, slower
            context = dropout_attention(q, k, v, mask, dropout_p, seed, scale)
        else:
            # The additive mask, made once for all layers: SDPA would convert a boolean one and keep a copy per layer.
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        context = context.transpose(1, 2).reshape(self.num_sequences, -1, q.shape[1] * q.shape[3])
        return context.squeeze(1) if first_only else self._from_sequences(context)
