"""Train a one-layer model with conv-basis attention on a copy task, with torch autograd.

Each target is the previous token, so every query must attend to the key one position back:
logits that depend on ``i - j``, the structure the k-conv basis captures.  The attention
layer is ``convbasis.torch.attention(method="conv", gradient="model")``: training follows the
exact gradient of the conv model's own output.  A few seconds on a CPU.

Run: python examples/train_copy.py  (needs PyTorch; without it the script says so and exits)
"""

import sys
import warnings

try:
    import torch
except ImportError:
    print("examples/train_copy.py needs PyTorch (pip install torch); skipped")
    sys.exit(0)

import convbasis
import convbasis.torch as cbt

# The model is the conv attention itself, approximation and all: while the logits lack an
# exact few-segment structure the library says so, and that is expected here.
warnings.filterwarnings("ignore", category=convbasis.ConvBasisWarning)

# Tensors this small run fastest on one thread (torch's pool costs more than it saves).
torch.set_num_threads(1)
torch.manual_seed(0)
vocab, n, width, batch, steps = 8, 32, 32, 16, 60


class CopyPrevious(torch.nn.Module):
    """Embedding (tokens and positions), one conv-attention head, output projection."""

    def __init__(self):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Parameter(0.5 * torch.randn(n, width))
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, x):
        h = self.tokens(x) + self.positions
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self.out(cbt.attention(q, k, v, method="conv", gradient="model", rank=4))


model = CopyPrevious()
optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
losses = []
for step in range(steps):
    x = torch.randint(vocab, (batch, n))
    logits = model(x)[:, 1:]  # position 0 has no previous token
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, :-1].reshape(-1))
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    losses.append(loss.item())
    if step % 10 == 0 or step == steps - 1:
        print(f"step {step:3d}: loss {loss.item():.3f}")

first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"mean loss of the first 5 steps {first:.3f}, of the last 5 {last:.3f}")
assert last < 0.5 * first, "the copy task did not train"
