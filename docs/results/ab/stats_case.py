import sys, time, torch, attnkit
import torch.nn.functional as F
n = int(sys.argv[1]); causal = sys.argv[2] == "causal"
torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
def sdpa(): return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
def one(): return attnkit.attention_stats(q, k, v, causal=causal, topk=8, pool=256, return_output=True)
def two(): return attnkit.attention_stats(q, k, v, causal=causal, topk=8, pool=256, return_output=True, backend="tiled")
fs = {"sdpa": sdpa, "one-pass": one, "two-pass": two}
for f in fs.values(): f()
res = {name: [] for name in fs}
for _ in range(3):
    for name, f in fs.items():
        t0 = time.process_time(); f(); res[name].append(time.process_time() - t0)
med = {name: sorted(t)[1] for name, t in res.items()}
print(n, "causal" if causal else "full", " ".join(f"{k}={v:.3f}" for k, v in med.items()),
      f"one/sdpa={med['one-pass']/med['sdpa']:.2f} two/sdpa={med['two-pass']/med['sdpa']:.2f}")
