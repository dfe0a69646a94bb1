//! The byte format of the fuzz inputs: little-endian integers read with `arbitrary`
//! (missing bytes read as zeros), tags as one byte, byte strings as a `u16` length and the
//! bytes. [`Enc`] writes the same format, for the seed generator.

use arbitrary::Unstructured;

/// The fuzzer's bytes.
pub type U<'a> = Unstructured<'a>;

/// A value with a byte encoding: decoding never fails, encoding is its inverse.
pub trait Wire: Sized {
    /// Reads a value (zeros once the input is exhausted).
    fn decode(u: &mut U<'_>) -> Self;
    /// Writes the value so that `decode` gives it back.
    fn encode(&self, e: &mut Enc);

    /// The encoding as bytes.
    fn to_bytes(&self) -> Vec<u8> {
        let mut e = Enc::default();
        self.encode(&mut e);
        e.0
    }
}

/// Implements `arbitrary::Arbitrary` through [`Wire`].
#[macro_export]
macro_rules! arbitrary_via_wire {
    ($t:ty) => {
        impl<'a> arbitrary::Arbitrary<'a> for $t {
            fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
                Ok(<$t as $crate::wire::Wire>::decode(u))
            }
            fn arbitrary_take_rest(mut u: arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
                Ok(<$t as $crate::wire::Wire>::decode(&mut u))
            }
        }
    };
}

pub fn u8(u: &mut U<'_>) -> u8 {
    u.arbitrary().unwrap_or(0)
}
pub fn u16(u: &mut U<'_>) -> u16 {
    u.arbitrary().unwrap_or(0)
}
pub fn u32(u: &mut U<'_>) -> u32 {
    u.arbitrary().unwrap_or(0)
}
pub fn u64(u: &mut U<'_>) -> u64 {
    u.arbitrary().unwrap_or(0)
}
pub fn bool(u: &mut U<'_>) -> bool {
    u8(u) & 1 == 1
}

/// A byte string of at most `max` bytes.
pub fn bytes(u: &mut U<'_>, max: usize) -> Vec<u8> {
    let n = (usize::from(u16(u)) % (max + 1)).min(u.len());
    u.bytes(n).map(<[u8]>::to_vec).unwrap_or_default()
}

/// Everything left.
pub fn rest(u: &mut U<'_>) -> Vec<u8> {
    let n = u.len();
    u.bytes(n).map(<[u8]>::to_vec).unwrap_or_default()
}

/// Decodes values until the input ends (at most `max`).
pub fn many<T: Wire>(u: &mut U<'_>, max: usize) -> Vec<T> {
    let mut v = Vec::new();
    while !u.is_empty() && v.len() < max {
        v.push(T::decode(u));
    }
    v
}

/// A list with a one-byte count (at most `max`).
pub fn list<T: Wire>(u: &mut U<'_>, max: usize) -> Vec<T> {
    let n = usize::from(u8(u)) % (max + 1);
    (0..n).map(|_| T::decode(u)).collect()
}

/// The encoder.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    /// A byte string for [`bytes`] (its length must be within that call's `max`).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u16(u16::try_from(b.len()).expect("byte strings are at most 64 KiB"));
        self.0.extend_from_slice(b);
        self
    }
    /// Raw bytes for [`rest`].
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A list for [`list`].
    pub fn list<T: Wire>(&mut self, items: &[T]) -> &mut Self {
        self.u8(u8::try_from(items.len()).expect("lists are short"));
        for i in items {
            i.encode(self);
        }
        self
    }
    /// Values for [`many`].
    pub fn many<T: Wire>(&mut self, items: &[T]) -> &mut Self {
        for i in items {
            i.encode(self);
        }
        self
    }
}
