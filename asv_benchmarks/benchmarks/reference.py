"""Dense oracles: blocked forward and backward, time and peak memory."""

from convbasis import attention, attention_backward

from .common import BACKENDS, namespace, uniform


class DenseAttention:
    params = (BACKENDS, [2**10, 2**12, 2**14, 2**16], [64])
    param_names = ["backend", "n", "d"]
    timeout = 3600

    def setup(self, backend, n, d):
        xp = namespace(backend)
        if backend == "array_api_strict" and n > 2**12:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.q, self.k, self.v, self.g = (xp.asarray(uniform((n, d), seed=s)) for s in range(4))

    def time_forward(self, backend, n, d):
        attention(self.q, self.k, self.v, block=512)

    def peakmem_forward(self, backend, n, d):
        attention(self.q, self.k, self.v, block=512)

    def time_backward(self, backend, n, d):
        attention_backward(self.q, self.k, self.v, self.g, block=512)

    def peakmem_backward(self, backend, n, d):
        attention_backward(self.q, self.k, self.v, self.g, block=512)
