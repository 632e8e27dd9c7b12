"""Layer-E states saved while drafting, and the plan for reusing them in verification.

While drafting, step j of request r fed token x_j at position p_r + j through layers < E
and produced the state s_j (the hidden and residual halves of the residual stream after
layer E). The next verification pass schedules, per request, [t, d1, ..., dK] at positions
p_r, p_r+1, ...; t = x_0 and d_j = x_j for j < K, so the first K tokens already have their
layer-E state. Only the last draft token dK (and whole segments of requests without saved
state: prefill chunks, new requests) must run layers < E; everything runs layers >= E.

A saved state is correct whenever its token and position match: the KV cache of layers < E
before that position is the request's true prefix either way. States live for one step:
`plan()` consumes them, so finished, aborted and preempted requests never see stale state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SavedDraft:
    rows: dict[str, int]  # request id -> row
    start_positions: torch.Tensor  # [B] position of each row's first draft input
    tokens: torch.Tensor  # [B, K] token fed at each draft step
    hidden: torch.Tensor  # [B, K, d]
    residual: torch.Tensor  # [B, K, d]


@dataclass
class ReusePlan:
    lower_index: torch.Tensor  # [n_lower] batch positions that must run layers < E
    lower_query_lens: list[int]  # per request: how many of its tokens are in lower_index
    reuse_index: torch.Tensor  # [n_reuse] batch positions whose layer-E state is known
    reuse_hidden: torch.Tensor  # [n_reuse, d]
    reuse_residual: torch.Tensor  # [n_reuse, d]


@dataclass
class ReuseStats:
    """Counters exposed through the worker (`collective_rpc("layerskip_stats")`)."""

    verify_passes: int = 0  # forward passes that reused at least one state
    full_passes: int = 0  # forward passes that ran every layer for every token
    scheduled_tokens: int = 0  # tokens in all target forward passes
    reused_tokens: int = 0  # tokens whose layers < E were skipped
    lower_token_layers: int = 0  # token x layer evaluations below E in target passes
    mismatches: int = 0  # requests whose saved state did not match what was scheduled
    draft_tokens: int = 0  # tokens run through the draft (K per request and round, no re-prefill)
    draft_steps: int = 0  # draft forward passes (one token per drafting request each)
    draft_seconds: float = 0.0  # wall time of the draft loops (host clock: exact on CPU)

    def as_dict(self) -> dict:
        return dict(vars(self))


class ExitStates:
    def __init__(self) -> None:
        self.saved: SavedDraft | None = None
        self.stats = ReuseStats()

    def save(self, req_ids, start_positions, tokens, hidden, residual) -> None:
        self.saved = SavedDraft(
            rows={rid: i for i, rid in enumerate(req_ids)},
            start_positions=start_positions.cpu(),
            tokens=tokens.cpu(),
            hidden=hidden,
            residual=residual,
        )

    def clear(self) -> None:
        self.saved = None

    def forget(self, req_ids) -> None:
        """Drop the saved states of requests that finished or were aborted."""
        if self.saved is not None:
            for rid in req_ids:
                self.saved.rows.pop(rid, None)
            if not self.saved.rows:
                self.saved = None

    def holds_states(self) -> bool:
        return self.saved is not None

    def count_full_pass(self, num_tokens: int, exit_layer: int) -> None:
        """A target pass with nothing to reuse (no plan was made)."""
        self.stats.scheduled_tokens += num_tokens
        self._full(num_tokens, exit_layer)

    def live_requests(self) -> int:
        """Requests whose states are held (for leak checks)."""
        return len(self.saved.rows) if self.saved is not None else 0

    def plan(
        self,
        req_ids: list[str],
        query_start_loc: list[int],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        exit_layer: int,
    ) -> ReusePlan | None:
        """Split a target batch into reused and recomputed tokens; None: run it all."""
        saved, self.saved = self.saved, None
        num_tokens = query_start_loc[-1]
        self.stats.scheduled_tokens += num_tokens
        if saved is None:
            return self._full(num_tokens, exit_layer)

        ids = input_ids[:num_tokens].cpu()
        pos = positions[:num_tokens].cpu()
        lower, lower_lens, reuse, rows, steps = [], [], [], [], []
        for i, rid in enumerate(req_ids):
            begin, end = query_start_loc[i], query_start_loc[i + 1]
            row = saved.rows.get(rid)
            matched = 0
            if row is not None and end > begin:
                # Leave the last scheduled token to be computed: it has no saved state
                # when all K drafts are scheduled, and computing one token is cheap.
                usable = min(end - begin - 1, saved.tokens.shape[1])
                if usable > 0 and int(pos[begin]) == int(saved.start_positions[row]):
                    same = ids[begin : begin + usable] == saved.tokens[row, :usable]
                    matched = usable if bool(same.all()) else int(same.int().cumprod(0).sum())
                if matched == 0:
                    self.stats.mismatches += 1
            reuse.extend(range(begin, begin + matched))
            rows.extend([row] * matched)
            steps.extend(range(matched))
            lower.extend(range(begin + matched, end))
            lower_lens.append(end - begin - matched)

        if not reuse:
            return self._full(num_tokens, exit_layer)
        self.stats.verify_passes += 1
        self.stats.reused_tokens += len(reuse)
        self.stats.lower_token_layers += len(lower) * exit_layer
        device = saved.hidden.device
        rows_t = torch.tensor(rows, device=device)
        steps_t = torch.tensor(steps, device=device)
        return ReusePlan(
            lower_index=torch.tensor(lower, dtype=torch.int64, device=input_ids.device),
            lower_query_lens=lower_lens,
            reuse_index=torch.tensor(reuse, dtype=torch.int64, device=input_ids.device),
            reuse_hidden=saved.hidden[rows_t, steps_t],
            reuse_residual=saved.residual[rows_t, steps_t],
        )

    def _full(self, num_tokens: int, exit_layer: int) -> None:
        self.stats.full_passes += 1
        self.stats.lower_token_layers += num_tokens * exit_layer
        return None
