"""Prefix products against the unmasked low-rank product on the same arrays.

Target (issue 2): n = 65536, r = p = 64, float32, NumPy: ``masked_lowrank_matmul`` at most
2.5x the time of ``u @ (v.T @ z)`` and peak memory at most 4x the inputs.
"""

from convbasis import masked_hadamard_matmul, masked_lowrank_matmul

from .common import BACKENDS, best_time, namespace, traced_peak, uniform


class MaskedLowRank:
    params = (BACKENDS, [2**10, 2**12, 2**14, 2**16], [64])
    param_names = ["backend", "n", "rank"]

    def setup(self, backend, n, rank):
        xp = namespace(backend)
        if backend == "array_api_strict" and n > 2**14:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.xp = xp
        self.u, self.v, self.z = (xp.asarray(uniform((n, rank), seed=s)) for s in range(3))

    def _unmasked(self):
        return self.u @ (self.xp.matrix_transpose(self.v) @ self.z)

    def time_masked(self, backend, n, rank):
        masked_lowrank_matmul(self.u, self.v, self.z)

    def time_masked_transpose(self, backend, n, rank):
        masked_lowrank_matmul(self.u, self.v, self.z, transpose=True)

    def time_unmasked(self, backend, n, rank):
        self._unmasked()

    def peakmem_masked(self, backend, n, rank):
        masked_lowrank_matmul(self.u, self.v, self.z)

    def track_time_ratio_to_unmasked(self, backend, n, rank):
        masked = best_time(lambda: masked_lowrank_matmul(self.u, self.v, self.z), repeat=5)
        return masked / best_time(self._unmasked, repeat=5)

    track_time_ratio_to_unmasked.unit = "ratio"

    def track_peak_ratio_to_inputs(self, backend, n, rank):
        if backend != "numpy":
            raise NotImplementedError("tracemalloc sees NumPy allocations only")
        inputs = 3 * self.u.nbytes
        return traced_peak(lambda: masked_lowrank_matmul(self.u, self.v, self.z)) / inputs

    track_peak_ratio_to_inputs.unit = "ratio"


class MaskedHadamard:
    params = (BACKENDS, [2**10, 2**12, 2**14], [16])
    param_names = ["backend", "n", "rank"]

    def setup(self, backend, n, rank):
        xp = namespace(backend)
        self.args = [xp.asarray(uniform((n, rank), seed=s)) for s in range(5)]

    def time_hadamard(self, backend, n, rank):
        masked_hadamard_matmul(*self.args)

    def time_hadamard_transpose(self, backend, n, rank):
        masked_hadamard_matmul(*self.args, transpose=True)
