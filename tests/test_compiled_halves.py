"""The guard filter of the draft's and the verification's compiled halves (no engine)."""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from vllm_layerskip.proposer import HALF_COMPILE_OPTIONS


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.depth = 3

    def run(self, hidden, positions):
        for layer in self.layers[: self.depth]:
            hidden = layer(hidden) + positions.unsqueeze(-1)
        return hidden


def test_input_guards_only_keeps_the_inputs_and_drops_the_modules():
    torch._dynamo.reset()
    stack = Stack()
    compiled = torch.compile(stack.run, dynamic=True, options=HALF_COMPILE_OPTIONS)
    entries = lambda: len(_debug_get_cache_entry_list(Stack.run.__code__))  # noqa: E731
    with torch.inference_mode():
        for n in (1, 3, 1, 5):  # one token (specialised) and many (symbolic): two graphs
            hidden, positions = torch.randn(n, 16), torch.arange(n, dtype=torch.float32)
            torch.testing.assert_close(compiled(hidden, positions), stack.run(hidden, positions))
        assert entries() == 2
        stack.double()
        # An input of another dtype still misses the guards and gets its own graph.
        hidden, positions = torch.randn(2, 16, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        torch.testing.assert_close(compiled(hidden, positions), stack.run(hidden, positions))
        assert entries() == 3
        graphs = counters["stats"]["unique_graphs"]
        # A module attribute is no longer guarded: changing it reuses the graph (the
        # contract: a served model's modules do not change). Unfiltered, this recompiles.
        stack.depth = 2
        compiled(hidden, positions)
        assert counters["stats"]["unique_graphs"] == graphs and entries() == 3
        # Inductor's own stride checks are off (HALF_COMPILE_OPTIONS): an input laid out
        # unlike the traced ones must still be caught by the guards, not read wrongly.
        transposed = torch.randn(16, 4, dtype=torch.float64).t()  # [4, 16], not contiguous
        positions = torch.arange(4, dtype=torch.float64)
        torch.testing.assert_close(compiled(transposed, positions), stack.run(transposed, positions))
