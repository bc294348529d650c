"""The round's maths on the device: the fused kernels of runtime/csrc/round.cu on device buffers.

Buffers are allocated once per workspace (runtime/round.py ``layout``); a ``freedit_round``
descriptor holds their addresses and the call's scalars, and every op is one launch on its lane's
stream. The host exchanges with the device only the joins of new samples (8 bytes + a label each)
and the report rows of a round (16 bytes per slot), both through pinned memory. Phases of a
repeated shape are captured as CUDA graphs and replayed (``capture``), after one plain run.
"""
from __future__ import annotations

import ctypes
import warnings

import numpy as np

from freedit.runtime.device import D2H, H2D, Device, DeviceBuffer
from freedit.runtime.kernels import VARIANCE_CODES, CudaError, KernelsMismatch
from freedit.runtime.ops import guided_channels
from freedit.runtime.round import RELAX_SCORES, VERIFIERS, RoundMaths, RoundSettings, RoundSpec, Workspace, layout
from freedit.runtime.streams import DeviceLane

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float

#: runtime/csrc/freedit_kernels.h ``freedit_round``, field for field.
_POINTERS = ("window_table", "table", "timesteps", "ddim_table", "relax_table", "x", "step", "has_parent", "sample", "label",
             "parent_feat", "parent_eps", "window_of", "first_row", "row_slot", "row_pos", "row_step", "draft_src",
             "draft_prev", "slot_rank", "v_x", "v_t", "v_y", "v_eps", "v_feat", "d_feat", "d_x", "d_t", "d_tfeat",
             "d_y", "d_feat_out", "d_eps", "mean_p", "log_var_p", "mean_q", "log_var_q", "eps_q", "log_r", "uniform",
             "gamma", "report", "results", "parent_gap")


class RoundDescriptor(ctypes.Structure):
    _fields_ = [(name, _I) for name in ("slots", "max_window", "max_rows", "channels", "pixels", "out_channels",
                                        "variance", "guided", "guided_channels", "num_steps", "feat_row_bytes", "ddim",
                                        "window", "results_rows", "relax_score", "verifier")] + \
               [("cfg_scale", _F), ("relax", _F), ("null_label", ctypes.c_longlong), ("seed", ctypes.c_ulonglong)] + \
               [(name, _P) for name in _POINTERS]


_ENTRIES = {
    "freedit_round_join": [_P, _P, _P, _I, _P],
    "freedit_round_plan": [_P, _P],
    "freedit_round_stage": [_P, _I, _P],
    "freedit_round_draft_inputs": [_P, _I, _I, _I, _P],
    "freedit_round_draft_step": [_P, _I, _I, _I, _I, _P],
    "freedit_round_verify": [_P, _I, _P],
    "freedit_round_decide": [_P, _I, _P],
    "freedit_round_commit": [_P, _I, _P],
}


class CaptureUnsupported(RuntimeError):
    """Raised by an engine that cannot be captured into a CUDA graph (the phase then runs plainly)."""


class DeviceRoundMaths(RoundMaths):
    kind = "device"

    def __init__(self, device: Device):
        self.device = device
        lib = device.lib
        missing = [name for name in _ENTRIES if not hasattr(lib, name)]
        if missing:
            raise KernelsMismatch(f"{device.kernels.path} lacks the round's entry points ({', '.join(missing)}): "
                                  f"a stale build; rebuild it")
        for name, argtypes in _ENTRIES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, _I
        self._fn = {name[len("freedit_round_"):]: getattr(lib, name) for name in _ENTRIES}
        self.graphs_enabled = True

    # -- workspaces -------------------------------------------------------------------------------
    def workspace(self, spec: RoundSpec) -> Workspace:
        dev = self.device
        made: list[DeviceBuffer] = []
        try:
            buffers = {}
            for name, (shape, dtype) in layout(spec).items():
                buffers[name] = dev.alloc(shape, dtype)
                made.append(buffers[name])
            ws = Workspace(spec, buffers)
            # pinned staging: the report the host reads, the joins it writes
            ws.report_host = dev.pinned(buffers["report"].shape, np.int32)
            ws.joins_host = dev.pinned(buffers["joins"].shape, np.int32)
            ws.labels_host = dev.pinned(buffers["join_labels"].shape, np.int64)
            ws.tables = {}
            ws.results_buffer = None
            dev.upload(np.full(spec.slots, -1, np.int32), buffers["step"])
        except BaseException:
            for buf in made:
                dev.free(buf)
            raise
        d = RoundDescriptor()
        info = spec.info
        d.slots, d.max_window, d.max_rows = spec.slots, spec.max_window, spec.max_rows
        d.channels, d.pixels, d.out_channels = info.in_channels, info.input_size ** 2, info.out_channels
        d.variance = VARIANCE_CODES[spec.variance]
        d.guided = int(spec.guided)
        d.guided_channels = guided_channels(info.cfg_mode, info.in_channels)
        d.feat_row_bytes = buffers["v_feat"].row_bytes
        d.null_label = info.null_label
        for name in _POINTERS:
            if name in buffers:
                setattr(d, name, buffers[name].ptr)
        ws.descriptor, ws.ref = d, ctypes.byref(d)
        return ws

    def free(self, ws: Workspace) -> None:
        for buf in [*ws.buffers.values(), *ws.tables.values(), *([ws.results_buffer] if ws.results_buffer else [])]:
            self.device.free(buf)

    def configure(self, ws: Workspace, settings: RoundSettings) -> None:
        sched = settings.schedule
        n = sched.num_steps
        abar_prev = sched.alphas_cumprod_prev
        tables = {
            "table": sched.transition_table().astype(np.float32),
            "timesteps": np.append(sched.timesteps, sched.timesteps[-1]).astype(np.float32),
            "ddim_table": np.stack([np.sqrt(abar_prev), np.sqrt(1.0 - abar_prev)], axis=1).astype(np.float32),
            "relax_table": np.stack([sched.posterior_log_variance_clipped, sched.log_betas], axis=1),
        }
        if settings.window_schedule is not None:
            tables["window_table"] = np.asarray(settings.window_schedule, dtype=np.int32)
        for name, host in tables.items():  # once per call, not per round
            buf = ws.tables.get(name)
            if buf is None or buf.shape != host.shape:
                if buf is not None:
                    self.device.free(buf)
                buf = ws.tables[name] = self.device.alloc(host.shape, host.dtype)
            self.device.upload(host, buf)
        d = ws.descriptor
        for name in ("table", "timesteps", "ddim_table", "relax_table"):
            setattr(d, name, ws.tables[name].ptr)
        d.window_table = ws.tables["window_table"].ptr if settings.window_schedule is not None else None
        d.num_steps, d.window, d.ddim = n, int(settings.window), int(settings.ddim)
        d.cfg_scale, d.relax, d.seed = float(settings.cfg_scale), float(settings.relax), int(settings.seed)
        d.relax_score = RELAX_SCORES.index(settings.relax_score)  # FREEDIT_RELAX_GAP = 0, _VARIANCE = 1
        d.verifier = VERIFIERS.index(settings.verifier)  # FREEDIT_VERIFY_STEP = 0, _BLOCK = 1
        ws.settings = settings
        self._drop_graphs(ws)  # captured graphs hold the old scalars

    def reserve_results(self, ws: Workspace, n: int) -> None:
        if ws.results_buffer is None or ws.results_buffer.shape[0] < n:
            if ws.results_buffer is not None:
                self.device.free(ws.results_buffer)
            ws.results_buffer = self.device.alloc((n, *ws.spec.state_shape), np.float32)
            ws.descriptor.results, ws.descriptor.results_rows = ws.results_buffer.ptr, n
            self._drop_graphs(ws)  # they wrote to the old buffer

    def _drop_graphs(self, ws: Workspace) -> None:
        for graph in ws.graphs.values():
            if graph is not None:
                self.device.destroy(graph)
        ws.graphs.clear()
        ws.seen.clear()

    def lanes(self, overlap: bool, timing: bool) -> tuple:
        return DeviceLane(self.device, "draft", timing), DeviceLane(self.device, "verify", timing)

    # -- the round's ops: one launch each -------------------------------------------------------------
    def _check(self, code: int, what: str) -> None:
        if code:
            k = self.device.kernels
            raise CudaError(f"freedit_round_{what}", code, k.error_name(code), k.error_string(code))

    def join(self, ws, joins, labels, lane) -> None:
        n = len(joins)
        ws.joins_host[:n], ws.labels_host[:n] = joins, labels
        stream = lane.stream
        self.device.copy(ws["joins"].ptr, ws.joins_host.ctypes.data, 8 * n, H2D, stream)
        self.device.copy(ws["join_labels"].ptr, ws.labels_host.ctypes.data, 8 * n, H2D, stream)
        self._check(self._fn["join"](ws.ref, ws["joins"].ptr, ws["join_labels"].ptr, n, stream.handle), "join")

    def plan(self, ws, lane) -> None:
        self._check(self._fn["plan"](ws.ref, lane.stream.handle), "plan")

    def stage(self, ws, rows, lane) -> None:
        self._check(self._fn["stage"](ws.ref, rows, lane.stream.handle), "stage")

    def draft_inputs(self, ws, k, n, n_prev, lane) -> None:
        self._check(self._fn["draft_inputs"](ws.ref, k, n, n_prev, lane.stream.handle), "draft_inputs")

    def draft_step(self, ws, k, n, rows, frozen, lane) -> None:
        self._check(self._fn["draft_step"](ws.ref, k, n, rows, int(frozen), lane.stream.handle), "draft_step")

    def verify(self, ws, rows, lane) -> None:
        self._check(self._fn["verify"](ws.ref, rows, lane.stream.handle), "verify")

    def decide(self, ws, rows, lane) -> None:
        self._check(self._fn["decide"](ws.ref, rows, lane.stream.handle), "decide")

    def commit(self, ws, rows, lane) -> None:
        self._check(self._fn["commit"](ws.ref, rows, lane.stream.handle), "commit")

    def fetch_report(self, ws, lane) -> None:
        self.device.copy(ws.report_host.ctypes.data, ws["report"].ptr, ws.report_host.nbytes, D2H, lane.stream)

    def report(self, ws) -> np.ndarray:
        return ws.report_host.copy()

    def results(self, ws, n: int) -> np.ndarray:
        return self.device.download(ws.results_buffer.rows(n))

    # -- CUDA graphs ----------------------------------------------------------------------------------
    def capture(self, ws, lane, key, phase) -> bool:
        """Replay the graph of ``key``; capture it on its second plain occurrence (the first is the
        warm-up TensorRT needs: enqueue once, synchronise, then capture). A failed capture warns
        once and the pipeline keeps plain launches."""
        if not self.graphs_enabled:
            return False
        if key in ws.graphs:
            graph = ws.graphs[key]
            if graph is None:
                return False
            graph.launch(lane.stream)
            return True
        ws.seen[key] = ws.seen.get(key, 0) + 1
        if ws.seen[key] < 2:
            return False
        lane.stream.synchronize()
        self.device.begin_capture(lane.stream)
        failure = None
        try:
            phase()
        except (CaptureUnsupported, CudaError) as exc:
            failure = exc
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = self.device.end_capture(lane.stream)
        if failure is not None or graph is None:
            reason = failure or (caught[0].message if caught else "unknown")
            warnings.warn(f"CUDA graph capture failed ({reason}); running plain launches from now on",
                          RuntimeWarning, stacklevel=4)
            self.graphs_enabled = False
            ws.graphs[key] = None
            return False
        ws.graphs[key] = graph
        graph.launch(lane.stream)
        return True

