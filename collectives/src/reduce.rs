//! Reduction kernels over byte buffers tagged with a dtype.
//!
//! The algorithms move bytes; when two contributions meet they call
//! [`reduce_into`]. Each kernel is a plain loop over two slices of the same
//! length with no branches on the data, which the compiler unrolls and
//! vectorizes (SSE/AVX on x86-64, NEON on aarch64). f16 and bf16 are widened
//! to f32 in blocks that stay in L1, reduced there, and narrowed back.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::types::{DType, ReduceOp};

/// Elements of f16/bf16 converted per block.
const HALF_BLOCK: usize = 512;
/// Bytes of an unaligned source copied to an aligned block at a time.
const UNALIGNED_BLOCK: usize = 4096;

trait Arith: Copy {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
}

macro_rules! float_arith {
    ($t:ty) => {
        impl Arith for $t {
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                <$t>::min(self, o)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
        }
    };
}

macro_rules! int_arith {
    ($t:ty) => {
        impl Arith for $t {
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                Ord::min(self, o)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                Ord::max(self, o)
            }
        }
    };
}

float_arith!(f32);
float_arith!(f64);
int_arith!(i32);
int_arith!(i64);
int_arith!(u8);

#[inline(always)]
fn zip_apply<T: Copy>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*d, *s);
    }
}

fn typed<T: Arith>(dst: &mut [T], src: &[T], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_apply(dst, src, T::add),
        ReduceOp::Prod => zip_apply(dst, src, T::mul),
        ReduceOp::Min => zip_apply(dst, src, T::min),
        ReduceOp::Max => zip_apply(dst, src, T::max),
    }
}

fn halves<H: HalfFloatSliceExt + ?Sized>(
    dst: &mut [u8],
    src: &[u8],
    op: ReduceOp,
    as_half: impl Fn(&[u8]) -> &H,
    as_half_mut: impl Fn(&mut [u8]) -> &mut H,
) {
    let mut a = [0f32; HALF_BLOCK];
    let mut b = [0f32; HALF_BLOCK];
    for (d, s) in dst
        .chunks_mut(2 * HALF_BLOCK)
        .zip(src.chunks(2 * HALF_BLOCK))
    {
        let n = d.len() / 2;
        as_half(d).convert_to_f32_slice(&mut a[..n]);
        as_half(s).convert_to_f32_slice(&mut b[..n]);
        typed(&mut a[..n], &b[..n], op);
        as_half_mut(d).convert_from_f32_slice(&a[..n]);
    }
}

/// `dst[i] = dst[i] (op) src[i]` for every element; `Avg` reduces as `Sum`
/// (the division happens once, in [`finish_avg`]). `src` may be unaligned
/// (a peer's payload read in place from a shared-memory ring): it then goes
/// through an aligned block that stays in L1.
///
/// # Panics
/// If the lengths differ or `dst` is not aligned for `dtype` (an internal
/// invariant: destinations are typed slices or 8-aligned scratch).
pub(crate) fn reduce_into(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "reduce_into: length mismatch");
    if (src.as_ptr() as usize) % dtype.size() != 0 {
        let mut block = [0u64; UNALIGNED_BLOCK / 8];
        let block: &mut [u8] = bytemuck::cast_slice_mut(&mut block);
        for (d, s) in dst
            .chunks_mut(UNALIGNED_BLOCK)
            .zip(src.chunks(UNALIGNED_BLOCK))
        {
            block[..s.len()].copy_from_slice(s);
            reduce_into(dtype, op, d, &block[..s.len()]);
        }
        return;
    }
    use bytemuck::{cast_slice as c, cast_slice_mut as m};
    match dtype {
        DType::F32 => typed::<f32>(m(dst), c(src), op),
        DType::F64 => typed::<f64>(m(dst), c(src), op),
        DType::I32 => typed::<i32>(m(dst), c(src), op),
        DType::I64 => typed::<i64>(m(dst), c(src), op),
        DType::U8 => typed::<u8>(dst, src, op),
        DType::F16 => halves::<[f16]>(dst, src, op, c::<u8, f16>, m::<u8, f16>),
        DType::BF16 => halves::<[bf16]>(dst, src, op, c::<u8, bf16>, m::<u8, bf16>),
    }
}

/// Divides every element by `world` (the end of an `Avg`). Integers truncate
/// toward zero.
pub(crate) fn finish_avg(dtype: DType, buf: &mut [u8], world: usize) {
    use bytemuck::cast_slice_mut as m;
    fn halves<H: HalfFloatSliceExt + ?Sized>(
        buf: &mut [u8],
        world: f32,
        as_half_mut: impl Fn(&mut [u8]) -> &mut H,
    ) {
        let mut a = [0f32; HALF_BLOCK];
        for d in buf.chunks_mut(2 * HALF_BLOCK) {
            let n = d.len() / 2;
            as_half_mut(d).convert_to_f32_slice(&mut a[..n]);
            a[..n].iter_mut().for_each(|x| *x /= world);
            as_half_mut(d).convert_from_f32_slice(&a[..n]);
        }
    }
    match dtype {
        DType::F32 => m::<u8, f32>(buf)
            .iter_mut()
            .for_each(|x| *x /= world as f32),
        DType::F64 => m::<u8, f64>(buf)
            .iter_mut()
            .for_each(|x| *x /= world as f64),
        DType::I32 => {
            let w = i32::try_from(world).unwrap_or(i32::MAX);
            m::<u8, i32>(buf).iter_mut().for_each(|x| *x /= w)
        }
        DType::I64 => {
            let w = i64::try_from(world).unwrap_or(i64::MAX);
            m::<u8, i64>(buf).iter_mut().for_each(|x| *x /= w)
        }
        DType::U8 => {
            let w = u8::try_from(world).unwrap_or(u8::MAX);
            buf.iter_mut().for_each(|x| *x /= w)
        }
        DType::F16 => halves::<[f16]>(buf, world as f32, m::<u8, f16>),
        DType::BF16 => halves::<[bf16]>(buf, world as f32, m::<u8, bf16>),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels() {
        let mut d = [1.0f32, 5.0, -2.0];
        let s = [2.0f32, 3.0, -4.0];
        reduce_into(
            DType::F32,
            ReduceOp::Max,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&s),
        );
        assert_eq!(d, [2.0, 5.0, -2.0]);

        let mut d: Vec<f16> = (0..1500).map(|i| f16::from_f32(i as f32)).collect();
        let s: Vec<f16> = (0..1500).map(|_| f16::from_f32(2.0)).collect();
        reduce_into(
            DType::F16,
            ReduceOp::Prod,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&s),
        );
        assert_eq!(d[1000].to_f32(), 2000.0);

        let mut i = [-7i32, 7, 255];
        finish_avg(DType::I32, bytemuck::cast_slice_mut(&mut i), 2);
        assert_eq!(i, [-3, 3, 127]);

        let mut u = [250u8, 10];
        reduce_into(DType::U8, ReduceOp::Sum, &mut u, &[10, 1]);
        assert_eq!(u, [4, 11]);

        // A source one byte off its alignment, longer than a block.
        let src: Vec<f64> = (0..1000).map(f64::from).collect();
        let mut shifted = vec![0u8; 8001];
        shifted[1..].copy_from_slice(bytemuck::cast_slice(&src));
        let mut d = vec![1.0f64; 1000];
        reduce_into(
            DType::F64,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut d),
            &shifted[1..],
        );
        assert!(d.iter().enumerate().all(|(i, x)| *x == i as f64 + 1.0));
    }
}
