"""One omniseg Mask2Former Swin-T forward at 512x512 (2 threads, 133 classes, 100 queries), fp32 vs bf16 autocast,
each timed once after one warm-up. A quick probe of the bf16 path: python benchmarks/bf16_forward_probe.py"""
import torch, time
from omegaconf import OmegaConf
from omniseg.config import load_config
from omniseg.models.registry import build_model
torch.set_num_threads(2)
cfg = load_config("mask2former_swin_t", ["model.num_queries=100"])
m = build_model(OmegaConf.to_container(cfg.model, resolve=True), num_classes=133, thing_ids=list(range(80))).eval()
x = m.normalize(torch.randint(0,256,(1,3,512,512),dtype=torch.uint8))
for dt in ("fp32", "bf16"):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt=="bf16"):
        m.forward_raw(x)
        t=time.perf_counter(); m.forward_raw(x); print(dt, round(time.perf_counter()-t,2), "s", flush=True)
