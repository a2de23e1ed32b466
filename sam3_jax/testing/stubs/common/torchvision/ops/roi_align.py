"""RoIAlign in plain PyTorch, following the semantics of torchvision's CPU kernel.

Bilinear samples on a regular grid inside each output bin, averaged. With sampling_ratio <= 0 the
grid is adaptive: ceil(roi_extent / output_size) samples per bin along each axis. Samples outside
[-1, size] contribute zero; coordinates in [-1, 0) are clamped to 0.
"""
import math

import torch


def _bilinear(feat, y, x):
    # feat (C, H, W); y, x: 1-D tensors of sample coordinates.
    _, h, w = feat.shape
    outside = (y < -1.0) | (y > h) | (x < -1.0) | (x > w)
    y = y.clamp(min=0.0)
    x = x.clamp(min=0.0)
    y0 = y.floor().long()
    x0 = x.floor().long()
    y_top = y0 >= h - 1
    x_top = x0 >= w - 1
    y0 = torch.where(y_top, torch.full_like(y0, h - 1), y0)
    x0 = torch.where(x_top, torch.full_like(x0, w - 1), x0)
    y1 = torch.where(y_top, y0, y0 + 1)
    x1 = torch.where(x_top, x0, x0 + 1)
    y = torch.where(y_top, y0.to(y.dtype), y)
    x = torch.where(x_top, x0.to(x.dtype), x)
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    val = (
        feat[:, y0, x0] * (hy * hx)
        + feat[:, y0, x1] * (hy * lx)
        + feat[:, y1, x0] * (ly * hx)
        + feat[:, y1, x1] * (ly * lx)
    )
    return torch.where(outside, torch.zeros_like(val), val)


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    if isinstance(boxes, (list, tuple)):
        boxes = torch.cat(
            [torch.cat([torch.full((len(b), 1), i, dtype=b.dtype), b], 1) for i, b in enumerate(boxes)]
        )
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    offset = 0.5 if aligned else 0.0
    out = input.new_zeros((boxes.shape[0], input.shape[1], ph, pw))
    f32 = torch.float32
    for r, box in enumerate(boxes):
        feat = input[int(box[0])]
        # Coordinates in float32 and in torchvision's order of operations, so samples that land
        # exactly on a border are classified the same way as in its kernel.
        x1, y1, x2, y2 = [(box[i].to(f32) * spatial_scale - offset) for i in range(1, 5)]
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = torch.clamp(rw, min=1.0), torch.clamp(rh, min=1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(rh) / ph))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(rw) / pw))
        count = max(gh * gw, 1)
        iy = torch.arange(gh, dtype=f32)
        ix = torch.arange(gw, dtype=f32)
        for i in range(ph):
            ys = y1 + i * bh + (iy + 0.5) * bh / gh
            for j in range(pw):
                xs = x1 + j * bw + (ix + 0.5) * bw / gw
                yy, xx = torch.meshgrid(ys, xs, indexing="ij")
                out[r, :, i, j] = _bilinear(feat, yy.reshape(-1), xx.reshape(-1)).sum(1) / count
    return out


class RoIAlign(torch.nn.Module):
    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned=False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input, rois):
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)
