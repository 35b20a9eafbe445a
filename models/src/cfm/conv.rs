//! The UNet's 3×3 / stride 1 / padding 1 convolution (most of its FLOPs).
//!
//! On the CPU in f32 it runs as a custom op: the input is copied once into a zero-padded,
//! row-flattened buffer; in that layout the input patch under kernel tap (kh, kw) is the same
//! buffer shifted by `kh·(W+2) + kw`, so the convolution is nine accumulating GEMMs
//! `W[:, :, kh, kw] · shifted(x)` straight out of it, with no im2col matrix. Outputs are
//! computed on the padded width (two junk columns a row, dropped when copying out) in
//! cache-sized column tiles, with the bias as the tiles' initial value. The backward pass is
//! shifted GEMMs too (tested against candle's conv2d gradients).
//! The stride-2 convolution of the downsampling layers is the same kernel on the input split
//! into its four (row, column) parity phases: tap (kh, kw) reads phase (kh mod 2, kw mod 2)
//! shifted by (kh/2, kw/2). It is used for inference only (no input tracking gradients);
//! with gradients, like on CUDA and in other dtypes, it is candle's `conv2d`.


use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// A 3×3, stride-1, padding-1 convolution with bias (weights `weight` [out, in, 3, 3], `bias`).
#[derive(Debug, Clone)]
pub(crate) struct Conv3x3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3x3 {
    pub fn new(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Self> {
        // Same initialisation as candle_nn::conv2d.
        let weight = vb.get_with_hints((out_ch, in_ch, 3, 3), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bound = 1.0 / (in_ch as f64).sqrt();
        let bias = vb.get_with_hints(out_ch, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { weight, bias })
    }
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv3x3(x, &self.weight, &self.bias)
    }
}

impl Conv3x3 {
    /// The convolution of x upsampled ×2 by nearest neighbour: [B, C, H, W] → [B, C', 2H, 2W].
    /// For inference the upsampling happens while the padded input is copied (no 4×-sized
    /// intermediate); with gradients it is `nearest_2x` then the convolution.
    pub fn forward_upsampled_2x(&self, x: &Tensor) -> Result<Tensor> {
        let tracked = [x, &self.weight, &self.bias].iter().any(|t| t.track_op());
        if x.device().is_cpu() && x.dtype() == DType::F32 && !tracked {
            let op = ShiftedGemmConv { stride: 1, upsample: true };
            x.contiguous()?.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)
        } else {
            self.forward(&super::layers::nearest_2x(x)?)
        }
    }

    /// The same convolution with stride 2 (padding 1): [B, C, H, W] → [B, C', ⌈H/2⌉, ⌈W/2⌉].
    pub fn forward_stride_2(&self, x: &Tensor) -> Result<Tensor> {
        let tracked = [x, &self.weight, &self.bias].iter().any(|t| t.track_op());
        if x.device().is_cpu() && x.dtype() == DType::F32 && !tracked {
            x.contiguous()?.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, ShiftedGemmConv { stride: 2, upsample: false })
        } else {
            let out_ch = self.bias.dim(0)?;
            x.conv2d(&self.weight, 1, 2, 1, 1)?.broadcast_add(&self.bias.reshape((1, out_ch, 1, 1))?)
        }
    }
}

/// `conv2d(x, weight, padding 1, stride 1) + bias` for x [B, C_in, H, W], weight
/// [C_out, C_in, 3, 3], bias [C_out]; the shifted-GEMM kernel on the CPU in f32.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, ShiftedGemmConv { stride: 1, upsample: false })
    } else {
        let out_ch = bias.dim(0)?;
        x.conv2d(weight, 1, 1, 1, 1)?.broadcast_add(&bias.reshape((1, out_ch, 1, 1))?)
    }
}

/// Stride 1 or 2 (padding 1), optionally on the input upsampled ×2 (nearest; stride 1 only).
/// Only plain stride 1 has a backward pass (see `forward_stride_2`, `forward_upsampled_2x`).
struct ShiftedGemmConv {
    stride: usize,
    upsample: bool,
}

/// Output columns per tile: a tile of output and its input rows stay in L2.
const TILE: usize = 512;

/// A pointer that may cross threads: every task writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the whole (Sync) wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("conv3x3: {what} must be f32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("conv3x3: {what} must be contiguous"),
    }
}

impl CustomOp3 for ShiftedGemmConv {
    fn name(&self) -> &'static str {
        "conv3x3-shifted-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c_in, h_in, w_in) = l1.shape().dims4()?;
        // The convolution's input: x, or x upsampled ×2 (nearest) as the padded copy is made.
        let (h, w) = if self.upsample { (2 * h_in, 2 * w_in) } else { (h_in, w_in) };
        let (c_out, k_in, kh, kw) = l2.shape().dims4()?;
        if k_in != c_in || kh != 3 || kw != 3 || l3.shape().dims() != [c_out] {
            candle_core::bail!(
                "conv3x3: input {:?}, weight {:?}, bias {:?} do not fit",
                l1.shape().dims(),
                l2.shape().dims(),
                l3.shape().dims()
            );
        }
        if b * c_in * h * w * c_out == 0 {
            candle_core::bail!("conv3x3: empty input {:?} or weight {:?}", l1.shape().dims(), l2.shape().dims());
        }
        let x = contiguous_f32(s1, l1, "input")?;
        let weight = contiguous_f32(s2, l2, "weight")?;
        let bias = contiguous_f32(s3, l3, "bias")?;

        // Output size, and the input laid out as `phases` zero-padded planes per channel of
        // `rows` × `pw`: stride 1 is the padded input itself; stride 2 its four parity phases
        // (phase (a, c) holds padded pixel (2u + a, 2v + c) at (u, v)).
        let stride = self.stride;
        let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let (phases, rows, pw) = match stride {
            1 => (1, h + 2, w + 2),
            2 => (4, ho + 1, wo + 1),
            other => candle_core::bail!("conv3x3: stride {other} (only 1 and 2)"),
        };
        // Two extra zeros so the last tap of the last padded column stays inside the plane.
        let plane = rows * pw + 2;
        let channel_len = phases * plane;
        let mut padded = vec![0f32; b * c_in * channel_len];
        padded.par_chunks_mut(channel_len).zip(x.par_chunks(h_in * w_in)).for_each(|(dst, src)| {
            if self.upsample {
                for r in 0..h {
                    let (at, row) = ((r + 1) * pw + 1, &src[(r / 2) * w_in..(r / 2 + 1) * w_in]);
                    for (j, d) in dst[at..at + w].iter_mut().enumerate() {
                        *d = row[j / 2];
                    }
                }
                return;
            }
            if stride == 1 {
                for (r, row) in src.chunks(w).enumerate() {
                    let at = (r + 1) * pw + 1;
                    dst[at..at + w].copy_from_slice(row);
                }
                return;
            }
            for (phase, dst) in dst.chunks_mut(plane).enumerate() {
                let (a, c) = (phase / 2, phase % 2);
                for u in 0..rows {
                    // Padded row 2u + a is input row 2u + a − 1.
                    let Some(r) = (2 * u + a).checked_sub(1).filter(|&r| r < h) else { continue };
                    let row = &src[r * w..(r + 1) * w];
                    for v in 0..pw {
                        if let Some(col) = (2 * v + c).checked_sub(1).filter(|&col| col < w) {
                            dst[u * pw + v] = row[col];
                        }
                    }
                }
            }
        });
        let (h, w) = (ho, wo);

        let mut out = vec![0f32; b * c_out * h * w];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let columns = h * pw;
        let threads = candle_core::utils::get_num_threads();
        // Up to TILE columns a tile; where there are few tiles, as many as a multiple of the
        // threads (narrower), so no thread idles through the last round (64² has 4224 padded
        // columns: 9 tiles of 512 would leave one of two threads idle for a ninth).
        let mut tiles = columns.div_ceil(TILE);
        if tiles > 1 && !(b * tiles).is_multiple_of(threads) && tiles < 8 * threads {
            tiles = tiles.next_multiple_of(threads);
        }
        let tile_width = columns.div_ceil(tiles);
        let tiles = columns.div_ceil(tile_width);
        // Jobs are (batch item, column tile, block of output channels). Deep levels have few
        // tiles, so their output channels are split until every thread has two jobs.
        let mut row_blocks = 1;
        while b * tiles * row_blocks < 2 * threads && c_out / (2 * row_blocks) >= 64 {
            row_blocks *= 2;
        }
        let rows_per_block = c_out.div_ceil(row_blocks);
        let jobs = b * tiles * row_blocks;
        let run_job = |acc: &mut Vec<f32>, job: usize| {
            let (item, rest) = (job / (tiles * row_blocks), job % (tiles * row_blocks));
            let (tile, block) = (rest / row_blocks, rest % row_blocks);
            let start = tile * tile_width;
            let n = tile_width.min(columns - start);
            let first_row = block * rows_per_block;
            let rows = rows_per_block.min(c_out - first_row);
            acc.resize(rows * n, 0.0);
            for (row, &bias) in acc.chunks_mut(n).zip(&bias[first_row..first_row + rows]) {
                row.fill(bias);
            }
            let input = &padded[item * c_in * channel_len..(item + 1) * c_in * channel_len];
            for tap in 0..9 {
                let (kh, kw) = (tap / 3, tap % 3);
                let shift = match stride {
                    1 => kh * pw + kw,
                    _ => ((kh % 2) * 2 + kw % 2) * plane + (kh / 2) * pw + kw / 2,
                };
                // SAFETY: lhs is weight[first_row.., :, tap] (rows c_in·9 apart, columns 9
                // apart), rhs is c_in rows of `n` columns `channel_len` apart starting at
                // start + shift, which ends before its plane does (see `plane`); dst is this
                // job's own buffer of rows × n.
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        c_in,
                        acc.as_mut_ptr(),
                        1,
                        n as isize,
                        true,
                        weight.as_ptr().add(first_row * c_in * 9 + tap),
                        9,
                        (c_in * 9) as isize,
                        input.as_ptr().add(start + shift),
                        1,
                        channel_len as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            // Copy the valid columns (padded column < w) of each output row in this tile.
            for (k, row) in acc.chunks(n).enumerate() {
                let co = first_row + k;
                let mut p = start;
                while p < start + n {
                    let (i, j) = (p / pw, p % pw);
                    let run_end = (i * pw + w).min(start + n);
                    if j < w {
                        let len = run_end - p;
                        let dst = ((item * c_out + co) * h + i) * w + j;
                        // SAFETY: (item, co, i, j..j+len) belongs to this job only.
                        unsafe { std::ptr::copy_nonoverlapping(row[p - start..].as_ptr(), out_ptr.get().add(dst), len) };
                    }
                    p = (i + 1) * pw;
                }
            }
        };
        // One accumulator per worker, reused across its jobs (no page faults per tile).
        (0..jobs).into_par_iter().for_each_init(Vec::new, run_job);
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, w))))
    }

    fn bwd(&self, x: &Tensor, weight: &Tensor, _bias: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.stride != 1 || self.upsample {
            candle_core::bail!("conv3x3: the stride-2 and upsampling kernels are inference only (no backward pass)");
        }
        // Also shifted GEMMs (candle's conv_transpose2d on the CPU is a direct loop, many
        // times slower): the input gradient is this same convolution of the output gradient
        // with the kernel transposed and flipped; the weight gradient is, for each of the
        // nine taps, grad · shifted(x)ᵀ summed over the batch.
        let (b, c_in, h, w) = x.dims4()?;
        let c_out = weight.dim(0)?;
        let flip = Tensor::new(&[2u32, 1, 0], x.device())?;
        let w_flipped = weight.transpose(0, 1)?.contiguous()?.index_select(&flip, 2)?.index_select(&flip, 3)?;
        let grad_x = conv3x3(grad, &w_flipped, &Tensor::zeros(c_in, DType::F32, x.device())?)?;

        let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let grad_rows = grad.reshape((b, c_out, h * w))?;
        let mut taps = Vec::with_capacity(9);
        for kh in 0..3 {
            for kw in 0..3 {
                let shifted = padded.narrow(2, kh, h)?.narrow(3, kw, w)?.contiguous()?.reshape((b, c_in, h * w))?;
                taps.push(grad_rows.matmul(&shifted.transpose(1, 2)?)?.sum(0)?);
            }
        }
        let grad_w = Tensor::stack(&taps, 2)?.reshape((c_out, c_in, 3, 3))?;
        let grad_b = grad.sum((0, 2, 3))?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn upsampled_input_matches_nearest_then_conv() {
        let dev = Device::Cpu;
        for (b, c_in, c_out, h, w) in [(2, 3, 5, 9, 20), (1, 4, 2, 1, 1), (1, 8, 130, 3, 4)] {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev).unwrap();
            let conv = Conv3x3 {
                weight: Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev).unwrap(),
                bias: Tensor::randn(0f32, 1.0, c_out, &dev).unwrap(),
            };
            let ours = conv.forward_upsampled_2x(&x).unwrap();
            let reference = conv.forward(&super::super::layers::nearest_2x(&x).unwrap()).unwrap();
            assert_eq!(ours.dims(), [b, c_out, 2 * h, 2 * w]);
            assert!(max_diff(&ours, &reference) < 1e-5, "upsampled {:?}", (b, c_in, c_out, h, w));
        }
    }

    #[test]
    fn stride_2_matches_candle_conv2d() {
        let dev = Device::Cpu;
        // Even and odd sides, several tiles, batch 2, one pixel.
        for (b, c_in, c_out, h, w) in [(2, 5, 7, 40, 34), (1, 3, 4, 7, 9), (1, 2, 3, 1, 1), (1, 8, 130, 6, 6)] {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev).unwrap();
            let conv = Conv3x3 {
                weight: Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev).unwrap(),
                bias: Tensor::randn(0f32, 1.0, c_out, &dev).unwrap(),
            };
            let ours = conv.forward_stride_2(&x).unwrap();
            let reference =
                x.conv2d(&conv.weight, 1, 2, 1, 1).unwrap().broadcast_add(&conv.bias.reshape((1, c_out, 1, 1)).unwrap()).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            assert!(max_diff(&ours, &reference) < 1e-4, "stride 2 {:?}", (b, c_in, c_out, h, w));
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let dev = Device::Cpu;
        // Several tiles per item, a partial last tile, batch 2, non-square, c_in ≠ c_out.
        // (1, 8, 130, 3, 5): one tile, so the output channels are split into two uneven blocks.
        for (b, c_in, c_out, h, w) in [(2, 5, 7, 19, 33), (1, 3, 2, 1, 1), (3, 4, 4, 2, 5), (1, 8, 130, 3, 5)] {
            let x = Var::randn(0f32, 1.0, (b, c_in, h, w), &dev).unwrap();
            let weight = Var::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev).unwrap();
            let bias = Var::randn(0f32, 1.0, c_out, &dev).unwrap();
            let conv = Conv3x3 { weight: weight.as_tensor().clone(), bias: bias.as_tensor().clone() };
            let ours = conv.forward(x.as_tensor()).unwrap();
            let reference = x
                .as_tensor()
                .conv2d(weight.as_tensor(), 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&ours, &reference) < 1e-4, "forward {:?}", (b, c_in, c_out, h, w));

            let probe = Tensor::randn(0f32, 1.0, ours.shape(), &dev).unwrap();
            let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &weight, &bias] {
                let d = max_diff(g_ours.get(v.as_tensor()).unwrap(), g_ref.get(v.as_tensor()).unwrap());
                assert!(d < 1e-3, "gradient differs by {d}");
            }
        }
    }
}
