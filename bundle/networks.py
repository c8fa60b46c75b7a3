"""The segmentation network with feature taps, and the projection heads used only during pre-training.

``FeatureUNet`` is a :class:`monai.networks.nets.BasicUNet` whose ``forward`` is untouched (logits out),
so it trains, infers, exports and serves in MONAI Label like any other network.  ``forward_features``
runs the *same* layers once and also returns the two tensors the pre-training losses read:

- ``encoder``: the bottleneck (``down_4`` output; the paper's *conv5*), ``B,C4,H/16,W/16``;
- ``decoder``: the last decoder features before the final 1x1 conv (``upcat_1`` output; the paper's
  *Up_conv2*), ``B,C5,H,W``.

The heads (``DenseClusterHead``, ``GlobalProjectionHead``, ``DenseProjectionHead``) are separate modules, so
the segmentation checkpoint holds exactly the keys of a plain ``BasicUNet``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch import nn

__all__ = ["PAPER_FEATURES", "FeatureUNet", "DenseClusterHead", "GlobalProjectionHead", "DenseProjectionHead"]

#: U-Net widths of the paper (Appendix F): encoder 32..512, last decoder block 32.
PAPER_FEATURES = (32, 64, 128, 256, 512, 32)


class FeatureUNet(BasicUNet):
    """2D BasicUNet whose single forward pass can also return the encoder and decoder features.

    Defaults follow the paper: widths ``(32, 64, 128, 256, 512, 32)``, BatchNorm + ReLU, no conv bias
    before a norm.  BatchNorm matters for the encoder contrastive loss: instance norm normalises every
    bottleneck channel per image, so globally pooled features of different images become nearly identical
    and L_con has nothing to contrast.

    Args:
        in_channels: input channels. Defaults to 1.
        out_channels: segmentation classes (logit channels). Defaults to 4.
        features: six widths, as ``BasicUNet``.
        act: activation, as ``BasicUNet``. Defaults to ReLU.
        norm: normalisation, as ``BasicUNet``. Defaults to BatchNorm (momentum 0.1).
        bias: conv bias. Defaults to False (a norm follows every conv).
        dropout: dropout ratio. Defaults to 0.
        upsample: ``"deconv"``, ``"pixelshuffle"`` or ``"nontrainable"``. Defaults to ``"deconv"``.

    Example::

        >>> net = FeatureUNet(out_channels=4, features=(8, 16, 32, 64, 128, 8))
        >>> feats = net.forward_features(torch.rand(2, 1, 64, 64))
        >>> feats["encoder"].shape, feats["decoder"].shape
        (torch.Size([2, 128, 4, 4]), torch.Size([2, 8, 64, 64]))
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        features: Sequence[int] = PAPER_FEATURES,
        act: str | tuple = "relu",
        norm: str | tuple = "batch",
        bias: bool = False,
        dropout: float | tuple = 0.0,
        upsample: str = "deconv",
    ) -> None:
        features = tuple(int(f) for f in features)
        if len(features) != 6 or min(features) < 1:
            raise ValueError(f"features must be six positive widths, got {features}.")
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            act=act,
            norm=norm,
            bias=bias,
            dropout=dropout,
            upsample=upsample,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder_channels = features[4]
        self.decoder_channels = features[5]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B,{self.in_channels},H,W), got {tuple(x.shape)}.")
        if x.shape[-1] < 16 or x.shape[-2] < 16:
            raise ValueError(f"spatial size must be at least 16x16 (four 2x poolings), got {tuple(x.shape[-2:])}.")

    def forward_features(self, x: torch.Tensor, with_logits: bool = True) -> dict[str, torch.Tensor]:
        """One pass through the U-Net returning ``{"encoder", "decoder"[, "logits"]}``.

        Args:
            x: images ``B,C_in,H,W`` (H and W at least 16; multiples of 16 keep skip shapes exact).
            with_logits: also apply ``final_conv`` (pre-training does not need it).

        Raises:
            ValueError: when ``x`` is not ``B,C_in,H,W`` or is smaller than 16x16.
        """
        self._check_input(x)
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = self.upcat_4(x4, x3)
        u3 = self.upcat_3(u4, x2)
        u2 = self.upcat_2(u3, x1)
        u1 = self.upcat_1(u2, x0)
        out = {"encoder": x4, "decoder": u1}
        if with_logits:
            out["logits"] = self.final_conv(u1)
        return out


class DenseClusterHead(nn.Module):
    """Several independent dense cluster projectors ``g`` (1x1 conv + K-way softmax), computed as one conv.

    Paper Sec. 2.1 / Appendix F: a linear projector of the decoder features to K cluster probabilities.

    Args:
        in_channels: decoder feature channels.
        num_clusters: K. Defaults to 40 (the paper).
        num_heads: independent heads M. Defaults to 3 (the authors' code).
        temperature: the softmax is taken of ``logits / temperature``. Defaults to 1 (the paper). A value below 1
            starts the heads away from the uniform assignment, where the gradient of the MI loss vanishes, and
            scales the heads' effective step size by ``1 / temperature``; it changes the parameterisation of
            ``g``, not the objective.

    Returns (forward):
        probabilities ``M,B,K,H,W`` (each ``[:, b, :, h, w]`` sums to one).

    Raises:
        ValueError: when ``num_clusters < 2``, ``num_heads < 1``, ``temperature <= 0`` or the input is not
            ``B,in_channels,H,W``.
    """

    def __init__(self, in_channels: int, num_clusters: int = 40, num_heads: int = 3, temperature: float = 1.0) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}.")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}.")
        self.in_channels = in_channels
        self.num_clusters = num_clusters
        self.num_heads = num_heads
        self.temperature = float(temperature)
        self.proj = nn.Conv2d(in_channels, num_clusters * num_heads, kernel_size=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster logits ``B,M,K,H,W`` (contiguous, divided by the temperature, before the softmax).

        The 1x1 conv is computed as one batched matrix product (``baddbmm``): on CPU about twice as fast as the
        convolution kernel for this shape, forward and backward, with the same ``proj`` parameters.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected features of shape (B,{self.in_channels},H,W), got {tuple(x.shape)}.")
        b, c, h, w = x.shape
        mk = self.num_heads * self.num_clusters
        weight = self.proj.weight.view(1, mk, c).expand(b, mk, c)
        bias = self.proj.bias.view(1, mk, 1).expand(b, mk, 1)
        y = torch.baddbmm(bias, weight, x.reshape(b, c, h * w))
        if self.temperature != 1.0:
            y = y / self.temperature
        return y.view(b, self.num_heads, self.num_clusters, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``M,B,K,H,W`` in fp32 (a transposed view of a contiguous ``B,M,K,H,W`` tensor, the layout
        the losses read without copying)."""
        return torch.softmax(self.logits(x).float(), dim=2).transpose(0, 1)


class GlobalProjectionHead(nn.Module):
    """Global projector for L_con: average pool -> Linear -> LeakyReLU -> Linear -> L2 normalisation.

    Args:
        in_channels: encoder bottleneck channels (512 at paper scale).
        hidden_dim: hidden width. Defaults to 256.
        out_dim: embedding size. Defaults to 256.

    Returns (forward):
        unit vectors ``B,out_dim``.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 256, out_dim: int = 256) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_dim), nn.LeakyReLU(0.01, inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
        x: features ``B,C,H,W``.
        mask: optional validity mask ``B,1,H,W`` (1 = valid): pooling averages only valid positions.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected features of shape (B,{self.in_channels},H,W), got {tuple(x.shape)}.")
        if mask is None:
            pooled = x.mean(dim=(2, 3))
        else:
            if mask.shape != (x.shape[0], 1, *x.shape[2:]):
                raise ValueError(f"mask must have shape {(x.shape[0], 1, *x.shape[2:])}, got {tuple(mask.shape)}.")
            m = mask.to(x.dtype)
            pooled = (x * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1.0)
        return F.normalize(self.mlp(pooled), dim=1)


class DenseProjectionHead(nn.Module):
    """Dense projector of Chaitanya et al. (2020), the "Contrast (Dec)" baseline of the paper's Table 2.

    1x1 conv -> LeakyReLU -> 1x1 conv, adaptive average pooling to a ``grid x grid`` map, L2 normalisation
    along channels.

    Args:
        in_channels: decoder feature channels.
        hidden_dim: hidden width. Defaults to 128.
        out_dim: embedding size. Defaults to 256.
        grid: output grid side. Defaults to 20 (Appendix E).

    Returns (forward):
        unit vectors ``B,out_dim,grid,grid``.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 128, out_dim: int = 256, grid: int = 20) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.grid = grid
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1), nn.LeakyReLU(0.01, inplace=True), nn.Conv2d(hidden_dim, out_dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected features of shape (B,{self.in_channels},H,W), got {tuple(x.shape)}.")
        y = F.adaptive_avg_pool2d(self.mlp(x), self.grid)
        return F.normalize(y, dim=1)
