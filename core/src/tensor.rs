//! Reading and writing the contents of ONNX `TensorProto`s.

use crate::error::{Error, Result};
use crate::onnx::TensorProto;
use crate::onnx::tensor_proto::{DataLocation, DataType};

/// The ONNX name of an element type (`float`, `int64`, ...), as used in messages.
pub fn dtype_name(data_type: i32) -> &'static str {
    match DataType::try_from(data_type) {
        Ok(DataType::Float) => "float",
        Ok(DataType::Uint8) => "uint8",
        Ok(DataType::Int8) => "int8",
        Ok(DataType::Uint16) => "uint16",
        Ok(DataType::Int16) => "int16",
        Ok(DataType::Int32) => "int32",
        Ok(DataType::Int64) => "int64",
        Ok(DataType::String) => "string",
        Ok(DataType::Bool) => "bool",
        Ok(DataType::Float16) => "float16",
        Ok(DataType::Double) => "double",
        Ok(DataType::Uint32) => "uint32",
        Ok(DataType::Uint64) => "uint64",
        Ok(DataType::Bfloat16) => "bfloat16",
        _ => "other",
    }
}

/// Bytes per element for fixed-size element types; `None` for strings, sub-byte and unknown types.
pub fn dtype_size(data_type: i32) -> Option<usize> {
    Some(match DataType::try_from(data_type).ok()? {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Uint8 | DataType::Int8 | DataType::Bool => 1,
        DataType::Uint16 | DataType::Int16 | DataType::Float16 | DataType::Bfloat16 => 2,
        DataType::Int64 | DataType::Double | DataType::Uint64 => 8,
        DataType::Complex64 => 8,
        DataType::Complex128 => 16,
        DataType::Float8e4m3fn
        | DataType::Float8e4m3fnuz
        | DataType::Float8e5m2
        | DataType::Float8e5m2fnuz
        | DataType::Float8e8m0 => 1,
        _ => return None,
    })
}

/// Number of elements a tensor declares (product of its dims), or an error on negative dims or overflow.
pub fn element_count(t: &TensorProto) -> Result<u64> {
    let mut n: u64 = 1;
    for &d in &t.dims {
        let d = u64::try_from(d).map_err(|_| Error::Tensor {
            tensor: t.name().to_string(),
            reason: format!("negative dimension {d} in {:?}", t.dims),
        })?;
        n = n.checked_mul(d).ok_or_else(|| Error::Tensor {
            tensor: t.name().to_string(),
            reason: format!("dimensions {:?} overflow", t.dims),
        })?;
    }
    Ok(n)
}

/// Whether the tensor's data lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location() == DataLocation::External
}

fn bad(t: &TensorProto, reason: String) -> Error {
    Error::Tensor {
        tensor: t.name().to_string(),
        reason,
    }
}

fn check_len(t: &TensorProto, got: usize) -> Result<usize> {
    let n = element_count(t)?;
    if n != got as u64 {
        return Err(bad(
            t,
            format!("holds {got} elements but its dims {:?} declare {n}", t.dims),
        ));
    }
    Ok(got)
}

/// The raw bytes as `N`-byte little-endian values, each read by `f`.
fn decode<const N: usize, T>(
    t: &TensorProto,
    raw: &[u8],
    f: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    Ok(raw_chunks::<N>(t, raw)?.into_iter().map(f).collect())
}

/// A loaded tensor's element type and raw bytes (`None`: typed fields); external data refused.
fn storage(t: &TensorProto) -> Result<(DataType, Option<&[u8]>)> {
    if is_external(t) {
        return Err(bad(t, "external data was not loaded".into()));
    }
    let dt = DataType::try_from(t.data_type()).unwrap_or(DataType::Undefined);
    Ok((dt, t.raw_data.as_deref()))
}

fn raw_chunks<const N: usize>(t: &TensorProto, raw: &[u8]) -> Result<Vec<[u8; N]>> {
    if !raw.len().is_multiple_of(N) {
        return Err(bad(
            t,
            format!("raw data of {} bytes is not a multiple of {N}", raw.len()),
        ));
    }
    let chunks: Vec<[u8; N]> = raw
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
        .collect();
    check_len(t, chunks.len())?;
    Ok(chunks)
}

/// The tensor's values as f32 (from float, double, float16 or integer storage).
pub fn to_f32(t: &TensorProto) -> Result<Vec<f32>> {
    let (dt, raw) = storage(t)?;
    let v: Vec<f32> = match (dt, raw) {
        (DataType::Float, Some(r)) => decode::<4, _>(t, r, f32::from_le_bytes)?,
        (DataType::Float, None) => t.float_data.clone(),
        (DataType::Double, Some(r)) => decode::<8, _>(t, r, |b| f64::from_le_bytes(b) as f32)?,
        (DataType::Double, None) => t.double_data.iter().map(|&v| v as f32).collect(),
        (DataType::Float16, Some(r)) => {
            decode::<2, _>(t, r, |b| f16_to_f32(u16::from_le_bytes(b)))?
        }
        (DataType::Float16, None) => t.int32_data.iter().map(|&v| f16_to_f32(v as u16)).collect(),
        _ => to_i64(t)?.into_iter().map(|v| v as f32).collect(),
    };
    check_len(t, v.len())?;
    Ok(v)
}

/// The tensor's values as i64 (from any integer or bool storage).
pub fn to_i64(t: &TensorProto) -> Result<Vec<i64>> {
    let (dt, raw) = storage(t)?;
    let v: Vec<i64> = match (dt, raw) {
        (DataType::Int64, Some(r)) => decode::<8, _>(t, r, i64::from_le_bytes)?,
        (DataType::Int64, None) => t.int64_data.clone(),
        (DataType::Uint64, Some(r)) => decode::<8, _>(t, r, |b| u64::from_le_bytes(b) as i64)?,
        (DataType::Uint64, None) => t.uint64_data.iter().map(|&v| v as i64).collect(),
        (DataType::Int32, Some(r)) => decode::<4, _>(t, r, |b| i32::from_le_bytes(b) as i64)?,
        (DataType::Uint32, Some(r)) => decode::<4, _>(t, r, |b| u32::from_le_bytes(b) as i64)?,
        (DataType::Int16, Some(r)) => decode::<2, _>(t, r, |b| i16::from_le_bytes(b) as i64)?,
        (DataType::Uint16, Some(r)) => decode::<2, _>(t, r, |b| u16::from_le_bytes(b) as i64)?,
        (DataType::Int8, Some(r)) => r.iter().map(|&b| b as i8 as i64).collect(),
        (DataType::Uint8 | DataType::Bool, Some(r)) => r.iter().map(|&b| b as i64).collect(),
        (
            DataType::Int32
            | DataType::Int16
            | DataType::Int8
            | DataType::Uint16
            | DataType::Uint8
            | DataType::Bool,
            None,
        ) => t.int32_data.iter().map(|&v| v as i64).collect(),
        (DataType::Uint32, None) => t.uint64_data.iter().map(|&v| v as i64).collect(),
        (DataType::Float | DataType::Double | DataType::Float16, _) => {
            to_f32(t)?.into_iter().map(|v| v as i64).collect()
        }
        _ => {
            return Err(bad(
                t,
                format!("element type {} is not numeric", dtype_name(t.data_type())),
            ));
        }
    };
    check_len(t, v.len())?;
    Ok(v)
}

/// A float tensor stored as little-endian raw data.
pub fn from_f32(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// An int64 tensor stored as little-endian raw data.
pub fn from_i64(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// An int8 tensor.
pub fn from_i8(name: &str, dims: &[i64], values: &[i8]) -> TensorProto {
    raw(
        name,
        dims,
        DataType::Int8,
        values.iter().map(|v| *v as u8).collect(),
    )
}

/// A uint8 tensor.
pub fn from_u8(name: &str, dims: &[i64], values: &[u8]) -> TensorProto {
    raw(name, dims, DataType::Uint8, values.to_vec())
}

/// An int32 tensor stored as little-endian raw data.
pub fn from_i32(name: &str, dims: &[i64], values: &[i32]) -> TensorProto {
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw(name, dims, DataType::Int32, bytes)
}

fn raw(name: &str, dims: &[i64], dtype: DataType, bytes: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(dtype as i32),
        raw_data: Some(bytes),
        ..Default::default()
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) & 1) as u32;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if frac == 0 {
            sign << 31
        } else {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            (sign << 31) | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
    } else if exp == 31 {
        (sign << 31) | (0xff << 23) | (frac << 13)
    } else {
        (sign << 31) | ((exp + 127 - 15) << 23) | (frac << 13)
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_through_raw_data() {
        let t = from_f32("w", &[2, 2], &[1.0, -2.5, 3.0, 0.0]);
        assert_eq!(to_f32(&t).unwrap(), vec![1.0, -2.5, 3.0, 0.0]);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut t = from_f32("w", &[3], &[1.0, 2.0]);
        assert!(to_f32(&t).unwrap_err().to_string().contains("declare 3"));
        t.dims = vec![i64::MAX, 4];
        assert!(
            element_count(&t)
                .unwrap_err()
                .to_string()
                .contains("overflow")
        );
    }

    #[test]
    fn f16_decodes() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
    }
}
