"""Helpers shared by the Python parity and differential tests."""
import torch


def write_token_rows(path, ids):
    """Writes a [rows, T] tensor of token ids as dsopen-eval --tokens reads them: one row per line."""
    with open(path, "w") as f:
        for row in ids.tolist():
            f.write(" ".join(map(str, row)) + "\n")


def randomize_extras(model, bias_std=0.0, norm_std=0.0):
    """A non-zero MoE correction bias (it exercises noaux_tc selection); with bias_std, random biases; with
    norm_std, RMSNorm weights 1 + N(0, norm_std) (so a norm applied in the wrong place or skipped shows)."""
    with torch.no_grad():
        for n, t in list(model.named_buffers()) + list(model.named_parameters()):
            if n.endswith("e_score_correction_bias"):
                t.copy_(torch.randn_like(t) * 0.05)
            elif bias_std and n.endswith(".bias"):
                t.copy_(torch.randn_like(t) * bias_std)
            elif norm_std and n.endswith("norm.weight"):
                t.copy_(1.0 + torch.randn_like(t) * norm_std)
