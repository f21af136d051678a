"""Tiny random-initialised models built from configs (nothing downloads) and their
calibration data, shared by the compress tests and the two-process worker."""
import torch


def tiny_vit(seed=0, depth=4):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=depth, num_heads=2, num_classes=10).eval()


def tiny_swin(seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2,
                             embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4,
                             num_classes=10).eval()


def tiny_bert(seed=0, layers=2, classifier=False):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=64, num_labels=3)
    return (BertForSequenceClassification(config) if classifier else BertModel(config)).eval()


def tiny_llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def images(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def token_batches(n_batches=5, batch=4, length=12, vocab=96, seed=1, padded=True):
    """Tokenised-like batches with ragged attention masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if padded:
            lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
            mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
            ids = ids * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


class PlainBlock(torch.nn.Module):
    """A pre-norm transformer block in plain PyTorch (no timm): attention + MLP."""

    def __init__(self, d, h):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential()
        self.mlp.fc1 = torch.nn.Linear(d, h)
        self.mlp.act = torch.nn.GELU()
        self.mlp.fc2 = torch.nn.Linear(h, d)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PlainViT(torch.nn.Module):
    """``blocks[i].mlp.fc1/fc2`` like a timm ViT, in plain PyTorch; input (B, T, d)."""

    def __init__(self, d=32, h=64, depth=4, classes=5):
        super().__init__()
        self.blocks = torch.nn.ModuleList(PlainBlock(d, h) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(1))


def plain_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return PlainViT(**kw).eval()


def tokens(n=40, t=6, d=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g)


DIST_KW = dict(group_size=1, steps=20, prune_every=5, lr=3e-3, progress=False, seed=3)


def dist_worker(rank, world, init_file, out_dir, weights_per_rank=False):
    """One rank of the two-process (gloo, CPU) tests: compress plain_vit and save the state and
    report, or the error (``weights_per_rank``: each rank builds its own random weights)."""
    import json
    import os

    import torch.distributed as dist

    import fips_kernels as fk

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with fk.use_backend("reference"):
            model, report = fk.compress(plain_vit(seed=rank if weights_per_rank else 0), calib_data=tokens(),
                                        **DIST_KW)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report.to_dict(), f)
    except ValueError as exc:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()
