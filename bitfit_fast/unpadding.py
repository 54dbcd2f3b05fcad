"""Which tokens of a batch exist, and attention over them alone.

A padded batch [B, T, d] with a padding mask (what every Hugging Face collator produces) becomes [N, d] rows of
real tokens, sequence after sequence; so does a packed one (Hugging Face's ``DataCollatorWithFlattening``: one row
of concatenated sequences whose ``position_ids`` restart at their least value, 0 or RoBERTa's ``padding_idx + 1``,
the convention of its flash-attention path). Every GEMM, LayerNorm, activation, dropout and bias-gradient sum then
runs on real tokens only, and the output is scattered back to the padded shape once, with zeros at the padding (as
flash-attention's BERT does).

Attention is the one op that needs the sequences apart. It runs on the real tokens laid out as [S, L] (S sequences,
L the longest in the batch) with a key-padding mask, through ``scaled_dot_product_attention`` (on CPU with dropout,
the same math in torch ops with a faster mask draw: ``torch_ops.dropout_attention``), at a cost of O(S·L²) scores.
On CPU, where lengths differ enough, the layout holds the sequences longest first and attention runs once per group
of similar lengths (``length_groups``), each group cut to its own longest: on real BBC News paragraph lengths that
computes ~0.58 of the padded layout's scores, on short sentences 0.1-0.4 (attention was ~12% of a CPU BERT-base
step). torch's variable-length alternatives do not serve both devices: ``varlen_attn`` is CUDA-only flash attention
without dropout; FlexAttention with a document mask has no dropout either (no ``dropout_p`` in torch 2.11 or 2.13:
a score_mod cannot drop probabilities after the softmax) and is fast only compiled; nested-tensor SDPA on CPU loops
over the sequences in the math kernel (slower than one padded call).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import graphs, task_rows
from .torch_ops import DropoutAttentionFunction, dropout_attention, fresh_outputs, packed_heads


class _ScatterRows(torch.autograd.Function):
    """rows x [N, ...] placed at ``index`` of a zero tensor [total, ...]. Unlike ``index_copy``, whose
    autograd keeps the source, it keeps only the index: its backward is a gather."""

    @staticmethod
    def forward(ctx, x, index, total):
        ctx.save_for_backward(index)
        return fresh_outputs(x.new_zeros(total, *x.shape[1:]).index_copy_(0, index, x))

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class _GroupViews(torch.autograd.Function):
    """q, k, v [S, H, L, D] in the attention layout as each length group's q, k, v [count, H, length, D] (with one
    query per sequence, its first row, q keeps its length of 1): views, no copy. The backward writes the groups'
    gradients, zeros past each group's length, straight into the rows [S, L, P, H, D] of the projection that made
    them (the parts of equal shape interleaved: q, k, v, or k, v beside a first-rows q), which
    ``torch_ops.packed_heads`` then takes as they are; autograd's backward of slicing would zero-fill a full-size
    buffer per group and add them up."""

    @staticmethod
    def forward(ctx, groups, q, k, v):
        ctx.groups, ctx.shapes = groups, (q.shape, k.shape, v.shape)
        return tuple(x[group.first:group.first + group.count, :, :group.length] for group in groups for x in (q, k, v))

    @staticmethod
    def backward(ctx, *grads):
        sequences, heads, length, dim = ctx.shapes[1]
        parts = 3 if ctx.shapes[0] == ctx.shapes[1] else 2  # a first-rows q gets a buffer of its own
        rows = grads[0].new_empty(sequences, length, parts, heads, dim)  # autograd hands zeros, never None
        full = [rows[:, :, part].transpose(1, 2) for part in range(parts)]
        if parts == 2:
            full.insert(0, grads[0].new_empty(ctx.shapes[0]))
        for part, buffer in enumerate(full):
            for group, grad in zip(ctx.groups, grads[part::3]):
                written = buffer[group.first:group.first + group.count]
                written[:, :, :grad.shape[2]] = grad
                written[:, :, grad.shape[2]:].zero_()
        return None, *full


class _GroupsToLayout(torch.autograd.Function):
    """The length groups' attention outputs [count, H, length, D] as the layout's rows [S, L, H·D], zeros where a
    sequence is shorter than L. The backward hands each group its part of the gradient: views, no copy."""

    @staticmethod
    def forward(ctx, groups, length, *contexts):
        heads, dim = contexts[0].shape[1], contexts[0].shape[3]
        out = contexts[0].new_empty(sum(group.count for group in groups), length, heads, dim)
        for group, context in zip(groups, contexts):
            rows = out[group.first:group.first + group.count]
            rows[:, :context.shape[2]] = context.transpose(1, 2)
            rows[:, context.shape[2]:].zero_()
        ctx.groups, ctx.lengths, ctx.head_shape = groups, [context.shape[2] for context in contexts], (heads, dim)
        return out.view(out.shape[0], length, heads * dim)

    @staticmethod
    def backward(ctx, grad):
        return None, None, *(
            grad[group.first:group.first + group.count, :length].unflatten(2, ctx.head_shape).transpose(1, 2)
            for group, length in zip(ctx.groups, ctx.lengths)
        )


class _HeadViews(torch.autograd.Function):
    """x [S, L, P * H * D] as P tensors [S, H, L, D] (attention's layout): views, no copy. Its backward
    interleaves the gradients into one [S, L, P * H * D] buffer (``torch_ops.packed_heads``: one pass, or none
    where they sit so already); autograd's backward of slicing the projections apart and splitting the heads
    zero-fills a full-width buffer per slice, copies into it and sums them (measured on an H200: 4 to 5 ms of a
    56 ms BERT-base step)."""

    @staticmethod
    def forward(ctx, x, parts, heads):
        ctx.parts = parts
        sequences, length, width = x.shape
        return x.view(sequences, length, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        return packed_heads(grads), None, None


def key_padding(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor | None:
    """[B, T] True where a token exists, if the attention ``mask`` (boolean, or additive with 0 where allowed;
    [B, 1, T, T] or [B, 1, 1, T]) lets every query see exactly the existing keys; None for any other mask."""
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[-1] != seq:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    # An additive value above -1e4 is a soft bias, not a block: softmax weighs it (exp(-1e4) is 0 in every float).
    if mask.dtype != torch.bool and not bool((allowed | (mask <= -1e4)).all()):
        return None
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
    (benches/results/gpu/profile-f776471.txt, aten::mm 174 vs 71 us) and left the GPU idle a quarter of the step."""
    step = max(64, (1 << (rows.bit_length() - 1)) // 16)
    return -(-rows // step) * step


# Devices on which attention runs per group of similar lengths (see ``length_groups``); elsewhere it is one call over
# [S, L]. On a GPU every call costs host time, which real-length steps already lacked there (host-bound: see
# ``bucketed``), and grouped attention has not been timed on one. The tests lower MIN_GROUP_SAVING to group their
# small batches.
GROUPED_DEVICES = {"cpu"}
# A sequence starts a new group where it is at most GROUP_LENGTH_RATIO of the group's longest and cutting there saves
# at least MIN_GROUP_SAVING scores per head. On a 2-core CPU a group's calls cost ~0.7 ms (fwd + bwd, a tiny
# group), and 128² scores take ~4.6 ms with BERT-base's 12 heads (73 ms for 16 × 128²) and ~0.8 ms with 2: a
# margin against groups that cost more than they save.
GROUP_LENGTH_RATIO = 0.8
MIN_GROUP_SAVING = 128 * 128


class LengthGroup(NamedTuple):
    """Sequences first..first + count - 1 of the attention layout, the longest ``length`` tokens; ``padded``: some
    are shorter (their keys past their length are masked)."""

    first: int
    count: int
    length: int
    padded: bool


def length_groups(lengths: list[int]) -> tuple[list[int], tuple[LengthGroup, ...]]:
    """The attention layout for sequences of ``lengths``: their order in it, longest first (a stable sort), and its
    groups of similar lengths, each attended over its own longest. Padded to the batch's longest L, attention
    computes S·L² scores per head; grouped, each group's count·length². A sequence starts a group where it is at
    most GROUP_LENGTH_RATIO of the current group's longest and the sequences from it on, none longer, then save at
    least MIN_GROUP_SAVING scores per head."""
    order = sorted(range(len(lengths)), key=lambda sequence: -lengths[sequence])
    ordered = [lengths[sequence] for sequence in order]

    def group(first: int, end: int) -> LengthGroup:
        return LengthGroup(first, end - first, ordered[first], ordered[end - 1] < ordered[first])

    groups, first = [], 0
    for position, length in enumerate(ordered):
        longest = ordered[first]
        saved = (len(ordered) - position) * (longest**2 - length**2)
        if length <= GROUP_LENGTH_RATIO * longest and saved >= MIN_GROUP_SAVING:
            groups.append(group(first, position))
            first = position
    return order, (*groups, group(first, len(ordered)))


def _layout(lengths: torch.Tensor):
    """(L, each sequence's place in the attention layout [S], the layout's sequences [S] or None when in the
    batch's order, its length groups or None for one call, key mask [S, 1, 1, L]) for sequences of ``lengths``
    [S]."""
    device = lengths.device
    max_len = int(lengths.max())
    place, order, groups = torch.arange(lengths.shape[0], device=device), None, None
    if device.type in GROUPED_DEVICES:
        sequences, groups = length_groups(lengths.tolist())
        if len(groups) > 1:
            order = torch.tensor(sequences, device=device)
            place = torch.empty_like(order).index_copy_(0, order, place)  # the inverse permutation
            lengths = lengths.index_select(0, order)
        else:
            groups = None
    key_mask = (torch.arange(max_len, device=device) < lengths.unsqueeze(1))[:, None, None, :]
    return max_len, place, order, groups, key_mask


class Tokens:
    """The layout of one batch's real tokens: built once per forward and shared by every layer (never cached
    across forwards). ``pack``/``unpack`` move hidden states between the batch's shape and [N, d] rows;
    ``attention`` runs over the rows, sequence by sequence. On a GPU the rows are ``bucketed``: zero rows after
    the N real ones, which no output reads, so their gradients are exactly zero and add nothing to any bias's.
    On CPU the attention layout may hold the sequences in another order than the batch (see ``length_groups``)."""

    def __init__(self, batch_shape, rows, slots, starts, max_len, key_mask, order=None, places=None, groups=None):
        self.batch_shape = batch_shape  # (B, T) of the hidden states
        self.rows = rows  # [N] real tokens' indices in the flattened [B·T]; None: every token is real
        self.slots = slots  # [N] their places in the [S·L] attention layout; None: rows laid out as [S, L]
        self.starts = starts  # [S] each sequence's first row, in the batch's order
        self.max_len = max_len  # L
        # [S, 1, 1, L] True where a key exists (or any attention mask), in layout order; None: every key exists
        self.key_mask = key_mask
        self.order = order  # [S] the sequence at each place of the layout; None: the batch's order
        self.places = places  # [S] each sequence's place in the layout (the inverse of ``order``)
        self.groups = groups  # the layout's length groups, attended one by one; None: one call over [S, L]
        index = rows if rows is not None else slots
        self.real_rows = index.shape[0] if index is not None else batch_shape[0] * batch_shape[1]  # N
        self.num_rows = bucketed(self.real_rows) if starts.device.type in BUCKETED_DEVICES else self.real_rows
        self._additive_masks = {}
        # [B, 1, T or 1, 1] True for a query of a kept boolean mask that may see no key (an empty example, a padding
        # query outside every window): SDPA with the boolean mask, Hugging Face's attention, gives it zeros, while
        # the additive mask would average every value (and torch's SDPA backward of such a row is not its
        # forward's gradient).
        self._blind_queries = {}
        self._row_tasks = {}

    @property
    def num_sequences(self) -> int:
        """S, the number of sequences."""
        return self.starts.shape[0]

    @classmethod
    def of_batch(cls, hidden: torch.Tensor, attention_mask=None, position_ids=None, cu_seq_lens=None,
                 keep_padding: bool = False, mask_is_padding: bool = False) -> "Tokens":
        """The layout for a [B, T, d] batch and the mask its layers receive. Packed sequences in a batch of one
        row are recognised by ``position_ids`` restarting at the first token's (the least: 0, or the collator's
        ``position_ids_start``, padding_idx + 1 for RoBERTa), or by flash-attention's ``cu_seq_lens`` (what
        ``DataCollatorWithFlattening`` returns); a mask that is not a key-padding mask, a batch whose first token
        is padding (left padding: the head would read a padding token), or any padded batch with
        ``keep_padding`` (a model whose loss reads the padding positions), is kept as it is.
        ``mask_is_padding``: the caller's word that the mask holds the batch's padding and nothing else (no
        sliding window), so that while a graph captures a batch declared free of padding it may be dropped."""
        batch, seq = hidden.shape[:2]
        device = hidden.device
        if attention_mask is not None and attention_mask.dim() == 2:
            # Hugging Face passes the 0/1 padding mask itself to a flash-attention model's layers.
            attention_mask = attention_mask.bool()[:, None, None, :]
        if graphs.capturing():
            # A CUDA graph being captured: no question to the GPU (a host sync) is allowed, and no shape may depend
            # on the data. Every token is kept, under the mask as it came, unless the batch was declared free of
            # padding (then the mask, all-True, is dropped: attention without one, the first-token shortcut).
            if batch == 1 and (cu_seq_lens is not None or position_ids is not None):
                raise RuntimeError("packed sequences (cu_seq_lens, or position_ids in a batch of one row) cannot be "
                                   "captured in a CUDA graph: where they start is data. Pad them into rows instead")
            mask = None if mask_is_padding and graphs.declared_without_padding() else attention_mask
            return cls((batch, seq), None, None, torch.arange(batch, device=device) * seq, seq, mask)
        if attention_mask is not None:
            valid = key_padding(attention_mask, batch, seq)
            if valid is None or not bool(valid[:, 0].all()) or (keep_padding and not bool(valid.all())):
                return cls((batch, seq), None, None, torch.arange(batch, device=device) * seq, seq, attention_mask)
            if bool(valid.all()):
                attention_mask = None
        if attention_mask is None:
            if batch == 1 and cu_seq_lens is not None:
                return cls.packed(seq, cu_seq_lens[:-1].to(device=device, dtype=torch.long))
            if batch == 1 and position_ids is not None:
                positions = position_ids.reshape(-1)
                starts = (positions == positions.min()).nonzero().squeeze(1)  # as Hugging Face's flash path
                if starts.numel() > 1 and int(starts[0]) == 0:
                    return cls.packed(seq, starts)
            return cls((batch, seq), None, None, torch.arange(batch, device=device) * seq, seq, None)
        lengths = valid.sum(dim=1)
        max_len, places, order, groups, key_mask = _layout(lengths)
        rows = valid.reshape(-1).nonzero().squeeze(1)
        slots = (valid.cumsum(dim=1) - 1 + places.unsqueeze(1) * max_len).reshape(-1)[rows]
        starts = torch.cumsum(lengths, 0) - lengths
        return cls((batch, seq), rows, slots, starts, max_len, key_mask, order, places, groups)

    @classmethod
    def packed(cls, total: int, starts: torch.Tensor) -> "Tokens":
        """One row of ``total`` tokens holding sequences that begin at ``starts``."""
        device = starts.device
        lengths = torch.diff(starts, append=torch.tensor([total], device=device))
        max_len, places, order, groups, key_mask = _layout(lengths)
        sequence = torch.repeat_interleave(torch.arange(starts.shape[0], device=device), lengths)
        slots = torch.arange(total, device=device) - starts[sequence] + places[sequence] * max_len
        return cls((1, total), None, slots, starts, max_len, key_mask, order, places, groups)

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
        if tasks is None:  # kept as the tasks are: read once a forward
            self._row_tasks[first_only] = None
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
            if mask is None:
                return None
            if (dtype, None) not in self._additive_masks:
                # A query whose keys are all at the lowest value (an empty example under eager attention) is run
                # unmasked: softmax of its scores, since torch's SDPA backward of an all-lowest row is not its
                # forward's gradient. Hugging Face's eager attention gives such a row uniform weights (the scores
                # vanish next to the lowest value) and the softmax Jacobian at them: the row's output and the
                # gradients through it differ from that (~2e-4 of the gradients' scale on a tiny BERT). Tokenizers
                # give every example at least its special tokens, so no real batch holds such a row.
                blind = (mask == torch.finfo(mask.dtype).min).all(dim=-1, keepdim=True)
                self._additive_masks[dtype, None] = mask.masked_fill(blind, 0.0).to(dtype)
            return self._additive_masks[dtype, None]
        if (dtype, window) not in self._additive_masks:
            allowed = mask if mask is None or mask.dtype == torch.bool else mask == 0
            if window is not None:
                position = torch.arange(self.max_len, device=self.starts.device)
                near = (position[:, None] - position[None, :]).abs() <= window
                allowed = near if allowed is None else allowed & near
            additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._additive_masks[dtype, window] = additive.masked_fill_(~allowed, torch.finfo(dtype).min)
            if self.rows is None and self.slots is None and mask is not None:  # a mask kept as it came
                self._blind_queries[window] = ~allowed.any(dim=-1, keepdim=True)
        return self._additive_masks[dtype, window]

    def attention(self, q, kv, heads: int, dropout_p: float, seed: int | None, scale: float,
                  keep_probabilities: bool, first_only: bool = False, window: int | None = None) -> torch.Tensor:
        """softmax(q k^T · scale + mask) v per sequence, for query rows q [N, d] (with ``first_only``, [S, d]: each
        sequence's first row, in the batch's order) and key-value rows kv [N, 2d] (k then v); returns q's shape. See
        :meth:`attend` (BERT's layers split their QKV GEMM's output into heads themselves:
        ``functions.LinearHeadsFunction``)."""
        k, v = _HeadViews.apply(self._to_sequences(kv), 2, heads)
        return self.attend(self.query_heads(q, heads, first_only), k, v, dropout_p, seed, scale, keep_probabilities,
                           first_only, window)

    def query_heads(self, q: torch.Tensor, heads: int, first_only: bool = False) -> torch.Tensor:
        """Query rows [N, d] (with ``first_only``, [S, d] in the batch's order) as [S, H, L, D] in the attention
        layout (L = 1 with ``first_only``)."""
        if first_only:
            q = (q if self.order is None else q.index_select(0, self.order)).unsqueeze(1)
        else:
            q = self._to_sequences(q)
        return q.view(self.num_sequences, -1, heads, q.shape[-1] // heads).transpose(1, 2)

    def attend(self, q, k, v, dropout_p: float, seed: int | None, scale: float, keep_probabilities: bool,
               first_only: bool = False, window: int | None = None) -> torch.Tensor:
        """softmax(q k^T · scale + mask) v for q, k, v [S, H, L, D] in the attention layout (q with L = 1 and
        ``first_only``: each sequence's first row); returns rows [N, H·D], or [S, H·D] in the batch's order with
        ``first_only``. With length groups, one call per group, each group drawing its own dropout mask.
        ``keep_probabilities=False`` runs the flash-style ``DropoutAttentionFunction``, which keeps q, k, v and the
        row logsumexp, not the probabilities; otherwise SDPA runs, or on CPU with dropout ``dropout_attention``.
        ``window``: each query sees the keys at most that many positions away (see ``additive_mask``)."""
        mask = self.additive_mask(k.dtype, window)
        if first_only and mask is not None:
            mask = mask[..., :1, :]  # a window's [L, L] mask: the first query's row
        if self.groups is None:
            context = _attention(q, k, v, mask, dropout_p, seed, scale, keep_probabilities)
            blind = self._blind_queries.get(window)
            if blind is not None:
                context = context.masked_fill(blind[..., :1, :] if first_only else blind, 0.0)
            context = context.transpose(1, 2).reshape(self.num_sequences, -1, q.shape[1] * q.shape[3])
        else:
            views = _GroupViews.apply(self.groups, q, k, v)
            contexts = []
            for index, group in enumerate(self.groups):
                q_g, k_g, v_g = views[3 * index:3 * index + 3]
                # The group's rows of the mask, cut to its length; none where its sequences fill it and no window
                # is narrower than it.
                masked = group.padded or (window is not None and group.length - 1 > window)
                mask_g = mask[group.first:group.first + group.count, :, :q_g.shape[2], :group.length] if (
                    mask is not None and masked) else None
                seed_g = None if seed is None else seed + index  # each group draws its own dropout mask
                contexts.append(_attention(q_g, k_g, v_g, mask_g, dropout_p, seed_g, scale, keep_probabilities))
            context = _GroupsToLayout.apply(self.groups, q.shape[2], *contexts)
        if first_only:
            context = context.squeeze(1)
            return context if self.order is None else context.index_select(0, self.places)
        return self._from_sequences(context)


def _attention(q, k, v, mask, dropout_p: float, seed: int | None, scale: float, keep_probabilities: bool):
    """softmax(q k^T · scale + mask) v with dropout, for q, k, v [S, H, L, D]: see ``Tokens.attend``."""
    if not keep_probabilities and dropout_p > 0.0:
        graphs.check_not_capturing("attention dropout without its probabilities (memory='lean' or 'minimal')")
        return DropoutAttentionFunction.apply(q, k, v, mask, dropout_p, seed, scale)
    if dropout_p > 0.0 and q.device.type == "cpu":  # SDPA's CPU path: dropout drawn by bernoulli_, slower
        return dropout_attention(q, k, v, mask, dropout_p, seed, scale)
    # The additive mask, made once for all layers: SDPA would convert a boolean one and keep a copy per layer.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
