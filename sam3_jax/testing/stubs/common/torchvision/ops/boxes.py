import torch


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy box (inclusive pixel indices) of each non-empty mask in (N, H, W)."""
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device, dtype=torch.float)
    n = masks.shape[0]
    out = torch.zeros((n, 4), device=masks.device, dtype=torch.float)
    for i in range(n):
        y, x = torch.where(masks[i] != 0)
        if len(x):
            out[i] = torch.stack([x.min(), y.min(), x.max(), y.max()]).float()
    return out
