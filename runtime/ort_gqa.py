"""onnxruntime binding of a decoder graph in the `gqa` form (export/lm.py): one `com.microsoft.GroupQueryAttention`
per layer, whose step reads only the cache rows filled so far.

The graph keeps the decoder contract of export/README.md (inputs_embeds, start, past_* -> logits, hidden, present_*),
but its attention is only defined on a *shared* past/present buffer: with separate buffers GroupQueryAttention copies
the filled rows into a fresh present and zeroes the rest, every step. So each cache is one buffer bound as both the
input and the output, allocated once (numpy on the CPU, a CUDA OrtValue on the CUDA provider, where it never leaves
the device).

Everything else a step touches is bound once too: `start`, the one-row embedding of a decode step and the two result
rows live in buffers allocated at load and bound for good; a decode step writes the row and the position into them
in place, runs, and copies the result rows out. Only a prefill (T > 1 rows) binds a fresh input, and the decode
binding is restored on the next step. That keeps the Python share of a token to a few numpy copies (measured in
benchmarks/RESULTS.md, "where a decode step's time goes").
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .decoder import KVDecoder
from .dtypes import ONNX_TYPES
from .onnx_backend import BackendError, _cache_order, cache_device


class GqaDecoder(KVDecoder):
    """One sequence's shared KV buffers on a gqa-form decoder session; everything a decode step binds, bound once."""

    def __init__(self, session: ort.InferenceSession, embed_table: np.ndarray, device: str | None = None,
                 device_id: int = 0):
        inputs = {i.name: i for i in session.get_inputs()}
        cache_names = sorted((n for n in inputs if n.startswith("past_")), key=_cache_order)
        if not cache_names or "inputs_embeds" not in inputs or "start" not in inputs:
            raise BackendError("not a decoder graph: it needs inputs_embeds, start and past_* cache inputs")
        first = inputs[cache_names[0]]
        super().__init__(embed_table, int(first.shape[2]), ONNX_TYPES[inputs["inputs_embeds"].type])
        self.session = session
        self.device = device or cache_device(session.get_providers())
        self.cache_names = cache_names
        cache_dtype = ONNX_TYPES[first.type]
        width = int(inputs["inputs_embeds"].shape[2])
        self.binding = session.io_binding()
        # The buffers of a decode step, written in place and bound once: numpy owns the memory, the OrtValues view it.
        self._start = np.zeros((), np.int64)
        self._row = np.zeros((1, 1, width), self.embed_dtype)
        self._values = {"start": ort.OrtValue.ortvalue_from_numpy(self._start),
                        "row": ort.OrtValue.ortvalue_from_numpy(self._row)}
        self.binding.bind_ortvalue_input("start", self._values["start"])
        # Results first, so they are the first values get_outputs() returns (as OrtDecoder binds them); then the cache.
        self.output_names = [o.name for o in session.get_outputs() if not o.name.startswith("present_")]
        self._outputs: dict[str, np.ndarray] = {}
        for out in session.get_outputs():
            if out.name.startswith("present_"):
                continue
            shape = [d if isinstance(d, int) else 1 for d in out.shape]  # (1, 1, V) and (1, 1, D) by contract
            self._outputs[out.name] = np.zeros(shape, ONNX_TYPES[out.type])
            self._values[out.name] = ort.OrtValue.ortvalue_from_numpy(self._outputs[out.name])
            self.binding.bind_ortvalue_output(out.name, self._values[out.name])
        self.cache: dict[str, np.ndarray] = {}
        self.cache_values: dict[str, ort.OrtValue] = {}
        for name in cache_names:
            shape = [int(d) for d in inputs[name].shape]
            if self.device == "cpu":
                self.cache[name] = np.zeros(shape, cache_dtype)
                self.cache_values[name] = ort.OrtValue.ortvalue_from_numpy(self.cache[name])
            else:
                # On the device, zeroed once: the cache never leaves it (only the result rows come down).
                self.cache_values[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, cache_dtype), self.device,
                                                                           device_id)
            self.binding.bind_ortvalue_input(name, self.cache_values[name])
            self.binding.bind_ortvalue_output("present_" + name[len("past_"):], self.cache_values[name])
        self._row_bound = False

    def _run(self, embeds: np.ndarray, start: int) -> dict[str, np.ndarray]:
        self._start[...] = start
        if embeds.shape[0] == 1:
            self._row[0] = embeds
            if not self._row_bound:
                self.binding.bind_ortvalue_input("inputs_embeds", self._values["row"])
                self._row_bound = True
        else:
            self.binding.bind_cpu_input("inputs_embeds", embeds[None])
            self._row_bound = False
        self.session.run_with_iobinding(self.binding)
        # Copies: the next step writes the same buffers.
        return {name: self._outputs[name][0, -1].astype(np.float32) for name in self.output_names}
