"""Observation encoders for pixel observations (pure torch).

The observation is the flat vector ``ncdpo_rllib.tasks.pixels.PixelObservations`` makes,
repeated for the last To steps: ``To x [state (k), image (H*W*3, 0..255)]``. The encoder
splits it, stacks the To frames as channels (scaled to [0, 1]), runs a CNN or a small ViT,
and returns ``[image features, state of the To steps]`` (the state only for pixels_state).

Random shift (DrQ, Kostrikov et al. 2020): replicate-pad by ``random_shift`` pixels and
crop back at a random integer offset per sample. It runs only while ``shifting`` is true:
behaviour cloning switches it on; the PPO update does only if ``shift_in_finetune``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = 3


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) -> same shape, each sample shifted by an integer offset in [-pad, pad]^2."""
    B, _, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    off = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator, device=images.device)
    rows = (torch.arange(H, device=images.device)[None] + off[:, :1])[:, :, None]  # (B, H, 1)
    cols = (torch.arange(W, device=images.device)[None] + off[:, 1:])[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class ConvTrunk(nn.Module):
    """Nature-DQN's three strided convolutions, then DrQ's Linear + LayerNorm + tanh."""

    def __init__(self, in_channels: int, image_size: int, feature_dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 16, 8, stride=4), nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(images))


class SmallViT(nn.Module):
    """An 8 x 8 grid of patches, width 64, ``depth`` pre-norm transformer blocks, mean pool."""

    def __init__(self, in_channels: int, image_size: int, feature_dim: int, width: int = 64, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        patch = image_size // 8
        self.patchify = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, 64, width))
        nn.init.normal_(self.pos, std=0.02)
        block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, feature_dim), nn.Tanh())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(images).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.blocks(tokens).mean(1))


class ObservationEncoder(nn.Module):
    """Flat [state, pixels of each camera] x To observations -> (B, out_dim) features; all frames
    of all cameras go into one trunk, stacked as channels."""

    def __init__(self, obs_dim: int, *, image_size: int, frames: int, use_state: bool, type: str = "cnn",
                 feature_dim: int = 64, random_shift: int = 0, cameras: int = 1):
        super().__init__()
        pixels = cameras * image_size * image_size * CHANNELS
        if obs_dim % frames or obs_dim // frames < pixels:
            raise ValueError(f"observation of {obs_dim} values does not hold {frames} frame(s) of {cameras} "
                             f"camera(s) of {image_size}x{image_size}x{CHANNELS} pixels")
        self.image_size, self.frames, self.cameras, self.use_state = image_size, frames, cameras, use_state
        self.state_dim = obs_dim // frames - pixels
        self.shift_pad = random_shift
        self.shifting = False
        trunk = {"cnn": ConvTrunk, "vit": SmallViT}[type]
        self.trunk = trunk(frames * cameras * CHANNELS, image_size, feature_dim)
        self.out_dim = feature_dim + (frames * self.state_dim if use_state else 0)

    def split(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(state (B, To*k), images (B, To*cameras*3, H, W) in [0, 1]; channels frame-major, then
        camera, then RGB)."""
        B, S, views = obs.shape[0], self.image_size, self.frames * self.cameras
        steps = obs.reshape(B, self.frames, -1)
        state = steps[..., : self.state_dim].reshape(B, -1)
        images = steps[..., self.state_dim :].reshape(B, views, S, S, CHANNELS)
        images = images.permute(0, 1, 4, 2, 3).reshape(B, views * CHANNELS, S, S) / 255.0
        return state, images

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        state, images = self.split(obs)
        if self.shifting and self.shift_pad:
            images = random_shift(images, self.shift_pad)
        features = self.trunk(images)
        return torch.cat([features, state], dim=-1) if self.use_state else features
