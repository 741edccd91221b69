"""Quantized replacements for nn.Linear: the SVDQuant W4A4 layer, AWQ W4A16, and a split-input pair.

These hold tensors in their logical layout with the checkpoint's dtypes, except the 4-bit weight
codes, which sit two per byte (numerics.pack_nibbles) as the kernels read them;
`packing.py` converts to and from Nunchaku's on-disk tile order. Forward passes are the exact reference of
what the kernels compute (see numerics.py), in PyTorch, on any device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pipeline.quantization import numerics as nx


class KeepsDtypes(nn.Module):
    """A module whose tensors keep their dtypes when the model is cast (pipe.to(dtype), .half(), .float()): they
    are a checkpoint's storage formats (4-bit codes, fp8/16-bit scales, fp32 bias), and re-rounding them would
    change the layer. Only the device follows the cast."""

    def _apply(self, fn, recurse=True):
        def device_only(t: torch.Tensor) -> torch.Tensor:
            return t.to(fn(t.new_empty(0)).device)

        return super()._apply(device_only, recurse)


def _row_chunks(n: int, k: int, elements: int = 1 << 22) -> list[slice]:
    """Output rows in chunks whose unpacked weights stay small (4 MiB of int8 codes, 16 MiB where they are decoded
    to fp32): a full-size layer's reference forward reuses a few allocations instead of faulting in a fresh
    (N, K) copy per layer."""
    step = max(1, elements // max(1, k))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _held_packed(qweight: Optional[torch.Tensor], packed_codes: Optional[torch.Tensor]) -> torch.Tensor:
    """The layers take logical codes (N, K) or codes already two per byte (N, K/2); they hold the latter."""
    if (qweight is None) == (packed_codes is None):
        raise ValueError("give exactly one of qweight (codes (N, K)) and packed_codes (two per byte, (N, K/2))")
    return nx.pack_nibbles(qweight) if packed_codes is None else packed_codes


class SVDQW4A4Linear(KeepsDtypes):
    """y = x̂·L1·L2 + Q(x̂)·Q(R) + b with x̂ = (x + shift) / smooth; L1 is stored pre-divided (proj_down).

    A fused projection (q, k, v share one input) is quantized once and held as several parts: each
    part owns its rows of the output-side tensors and shares the input-side ones (smooth, proj_down),
    so its output equals the fused layer's rows. `ckpt_name` and `rows` say where it sits in the file.
    `qweight` is given as logical codes (N, K) and held packed, two per byte, in `packed_codes`.
    """

    takes_gate = True  # forward computes gated_residual + gate · y (gated_linear)

    def __init__(self, *, precision: str, wscales, smooth, proj_down, proj_up, qweight=None, packed_codes=None,
                 bias=None, smooth_orig=None, wtscale=None, wcscales=None, act_unsigned: bool = False,
                 act_shift: float = 0.0, ckpt_name: str = "", rows: Optional[tuple[int, int]] = None):
        super().__init__()
        packed_codes = _held_packed(qweight, packed_codes)
        self.precision = precision
        self.out_features, self.in_features = packed_codes.shape[0], packed_codes.shape[1] * 2
        self.rank = proj_down.shape[1]
        self.act_unsigned = act_unsigned
        self.act_shift = act_shift
        self.ckpt_name = ckpt_name
        self.rows = rows or (0, self.out_features)
        self.register_buffer("packed_codes", packed_codes)
        # (N, K/G) values held group-major (as Nunchaku files store them): the GEMM reads each group's
        # scales contiguously without a per-call transpose
        self.register_buffer("wscales", wscales.t().contiguous().t())
        self.register_buffer("smooth", smooth)
        self.register_buffer("smooth_orig", smooth if smooth_orig is None else smooth_orig)
        self.register_buffer("proj_down", proj_down)
        self.register_buffer("proj_up", proj_up)
        self.register_buffer("bias", bias)
        self.register_buffer("wtscale", wtscale)
        self.register_buffer("wcscales", wcscales)

    @property
    def qweight(self) -> torch.Tensor:
        """The logical weight codes (N, K): int8 in [-8, 7] (INT4) or uint8 E2M1 codes (NVFP4)."""
        return nx.unpack_nibbles(self.packed_codes, signed=self.precision == "int4")

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.precision}, rank={self.rank}, "
                f"unsigned={self.act_unsigned}, part={self.ckpt_name}[{self.rows[0]}:{self.rows[1]}]")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                gated_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = layer(x) [+ residual, added in fp32 before the one rounding to x's dtype], then, with gate (B, N)
        for x (B, S, K), gated_residual + gate · y as AdaLN-Zero blocks compute it (fused_block.gated)."""
        from pipeline.kernels.dispatch import kernel_mode, w4a4_config

        mode = kernel_mode(x.device, self.precision, w4a4_config(self, x.dtype, residual is not None, gate is not None))
        if mode != "reference":
            from pipeline.kernels.ops import w4a4_linear

            def rows(t):
                return None if t is None else t.reshape(-1, self.out_features)

            y = w4a4_linear(x.reshape(-1, self.in_features), self.packed_codes, self.wscales, self.smooth,
                            self.proj_down, self.proj_up, self.bias, self.wtscale, self.wcscales,
                            float(self.act_shift), self.act_unsigned, mode, rows(residual), gate, rows(gated_residual))
            return y.reshape(*x.shape[:-1], self.out_features)
        return gated(self.reference_forward(x, residual), gate, gated_residual)

    def reference_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The oracle: exactly the kernels' arithmetic, in plain PyTorch (any device, compile-friendly)."""
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        if self.act_shift:
            x2 = x2 + self.act_shift
        low = x2.float() @ self.proj_down.float()  # on the raw input: proj_down is L1 / smooth
        xs = x2 / self.smooth.to(dtype)
        a_codes, a_scales = nx.quantize_act(xs, self.precision, self.act_unsigned)
        out = torch.cat([nx.w4a4_matmul(a_codes, a_scales, nx.unpack_nibbles(self.packed_codes[rows], self.precision
                                                                              == "int4"), self.wscales[rows],
                                        self.precision) for rows in _row_chunks(self.out_features, self.in_features)],
                        dim=1)
        if self.precision == "nvfp4":
            out = out * self.wtscale.float() * self.wcscales.float()
        if self.bias is not None:
            out = out + self.bias.float()
        out = out + low @ self.proj_up.float().T
        if residual is not None:
            out = out + residual.reshape(-1, self.out_features).float()
        return out.to(dtype).reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective (N, K) weight in x-space, for reports and error analysis."""
        r = nx.dequantize(self.qweight, self.wscales, self.precision, self.wtscale)
        if self.wcscales is not None:
            r = r * self.wcscales.float()[:, None]
        w_hat = r + self.proj_up.float() @ (self.proj_down.float() * self.smooth.float()[:, None]).T
        return w_hat / self.smooth.float()[None, :]


def is_int4_w4a4(layer: nn.Module) -> bool:
    """Whether the INT4 kernels' fused paths (fused MLP, joint projections) can take this layer."""
    return isinstance(layer, SVDQW4A4Linear) and layer.precision == "int4"


def joint_linear(layers: tuple[nn.Module, ...], xs: tuple[torch.Tensor, ...]) -> Optional[torch.Tensor]:
    """torch.cat([layer(x) for each stream], dim=1) with each GEMM writing its rows of the joint tensor in place
    (svdq::w4a4_linear_joint), for streams x (B, S_i, K) through INT4 W4A4 layers of one output width; None where
    that does not apply or the INT4 kernels do not run (the caller runs the layers one by one)."""
    from pipeline.kernels.dispatch import int4_dot, joint_config

    if not (all(is_int4_w4a4(m) for m in layers) and len({m.out_features for m in layers}) == 1
            and all(x.dim() == 3 for x in xs) and len({(x.shape[0], x.dtype, x.device) for x in xs}) == 1):
        return None
    mode = int4_dot(xs[0].device, joint_config(layers, xs[0].dtype))
    if mode is None:
        return None
    from pipeline.kernels.ops import w4a4_linear_joint

    return w4a4_linear_joint(list(xs), [m.packed_codes for m in layers], [m.wscales for m in layers],
                             [m.smooth for m in layers], [m.proj_down for m in layers], [m.proj_up for m in layers],
                             [m.bias for m in layers], [float(m.act_shift) for m in layers],
                             [m.act_unsigned for m in layers], mode)


class AWQW4A16Linear(KeepsDtypes):
    """4-bit weights, 16-bit activations: w = q·s + z per 64-group, q in 0..15 (the AdaLN modulation).

    Held two codes per byte like the SVDQuant layer. Its input is one row per image (the timestep
    embedding): on CUDA a Triton GEMV reads the packed codes; otherwise the PyTorch reference."""

    def __init__(self, *, wscales, wzeros, bias, qweight=None, packed_codes=None, ckpt_name: str = ""):
        super().__init__()
        packed_codes = _held_packed(qweight, packed_codes)
        self.out_features, self.in_features = packed_codes.shape[0], packed_codes.shape[1] * 2
        self.ckpt_name = ckpt_name
        self.register_buffer("packed_codes", packed_codes)
        self.register_buffer("wscales", wscales)
        self.register_buffer("wzeros", wzeros)
        self.register_buffer("bias", bias)  # fp32, diffusers semantics (no folded +1)

    @property
    def qweight(self) -> torch.Tensor:
        """The logical codes (N, K), uint8 in [0, 15]; held two per byte in `packed_codes`."""
        return nx.unpack_nibbles(self.packed_codes, signed=False)

    def weight_fp32(self, rows: slice = slice(None)) -> torch.Tensor:
        g = nx.INT4_GROUP
        q = nx.unpack_nibbles(self.packed_codes[rows], signed=False).float()
        w = q.reshape(q.shape[0], -1, g) * self.wscales[rows].float().unsqueeze(-1) + self.wzeros[rows].float().unsqueeze(-1)
        return w.reshape(q.shape[0], self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pipeline.kernels.dispatch import awq_config, awq_kernel

        x2 = x.reshape(-1, self.in_features)
        if awq_kernel(x.device, x2.shape[0], awq_config(self, x.dtype)):
            from pipeline.kernels.ops import awq_w4a16_gemv

            y = awq_w4a16_gemv(x2, self.packed_codes, self.wscales, self.wzeros, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.float()
        y = torch.cat([x2 @ self.weight_fp32(rows).T for rows in _row_chunks(self.out_features, self.in_features)],
                      dim=-1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class SplitInputLinear(nn.Module):
    """FLUX single blocks' proj_out: [attention | MLP] inputs, quantized as two layers and summed."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.split = first.in_features
        self.first, self.second = first, second
        self.in_features = first.in_features + second.in_features
        self.out_features = first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each half is read in place (no copy of the slice), and the second layer adds the first's
        # output in its epilogue (no separate add over the output).
        first = self.first(x[..., : self.split])
        if isinstance(self.second, SVDQW4A4Linear):
            return self.second(x[..., self.split :], residual=first)
        return first + self.second(x[..., self.split :])


def gated(y: torch.Tensor, gate: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
    """AdaLN-Zero's gated residual sum, residual + gate · y (gate (B, N), y (B, S, N)), as diffusers computes it."""
    return y if gate is None else residual + gate.unsqueeze(1) * y


def gated_linear(module: nn.Module, x: torch.Tensor, gate: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor]) -> torch.Tensor:
    """residual + gate · module(x): in the last GEMM's epilogue for a module that takes the gate (an SVDQuant
    layer, a fused MLP), else diffusers' ops."""
    if gate is not None and getattr(module, "takes_gate", False):
        return module(x, gate=gate, gated_residual=residual)
    return gated(module(x), gate, residual)
