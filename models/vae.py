"""Video codecs. `pixel`: a parameter-free space-to-depth codec for CPU debugging runs.

It keeps the causal Wan VAE's frame structure (frame 0 coded alone, then groups of 4 frames, so F = 1 + 4k
pixel frames give 1 + k latent frames) so everything downstream of the codec is the same code for both.
"""
import torch


class PixelCodec:
    """[B, 3, 1+4k, H, W] in [-1, 1] <-> [B, 3*4*s*s, 1+k, H/s, W/s]; frame 0 is repeated to fill its group."""
    stride = (4, 4, 4)
    z_dim = 3 * 4 * 4 * 4

    def encode(self, video):
        B, C, F, H, W = video.shape
        if (F - 1) % 4 or H % 4 or W % 4:
            raise ValueError(f'pixel codec needs 1+4k frames and sides divisible by 4, got {F} frames of {H}x{W}')
        x = torch.cat([video[:, :, :1].expand(-1, -1, 4, -1, -1), video[:, :, 1:]], dim=2)
        x = x.view(B, C, F // 4 + 1, 4, H // 4, 4, W // 4, 4)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, self.z_dim, F // 4 + 1, H // 4, W // 4)

    def decode(self, z):
        B, _, T, h, w = z.shape
        x = z.view(B, 3, 4, 4, 4, T, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, 3, T * 4, h * 4, w * 4)
        return torch.cat([x[:, :, :4].mean(2, keepdim=True), x[:, :, 4:]], dim=2)  # frame 0's group: 4 copies


def load_codec(name):
    if name == 'pixel':
        return PixelCodec()
    raise ValueError(f"unknown codec '{name}'; this version has: pixel")
