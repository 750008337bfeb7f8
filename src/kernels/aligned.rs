//! A growable f32 buffer aligned to the 64-byte cache line, for packed
//! matrix panels (aligned vector loads, no panel split across lines).

/// Floats per cache line.
const LINE_FLOATS: usize = 16;

/// One cache line of floats.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; LINE_FLOATS]);

/// A cache-line-aligned `[f32]` of a given length.
#[derive(Debug, Clone, Default)]
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        Self {
            lines: vec![Line::default(); len.div_ceil(LINE_FLOATS)],
            len,
        }
    }

    /// Grows the buffer to at least `len` floats (new space is zero; old
    /// contents are kept).
    pub fn ensure(&mut self, len: usize) {
        if len > self.len {
            self.lines
                .resize(len.div_ceil(LINE_FLOATS), Line::default());
            self.len = len;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` contiguous, initialised f32s
        // (Line is repr(C) over [f32; 16]).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, with unique access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_aligned_zeroed_and_keeps_contents_when_grown() {
        let mut buf = AlignedBuf::zeros(5);
        assert_eq!(buf.as_slice(), &[0.0; 5]);
        assert_eq!(buf.as_slice().as_ptr() as usize % 64, 0);
        buf.as_mut_slice()[4] = 2.5;
        buf.ensure(40);
        assert_eq!(buf.len(), 40);
        assert_eq!(buf.as_slice()[4], 2.5);
        assert_eq!(buf.as_slice()[39], 0.0);
        assert_eq!(buf.as_slice().as_ptr() as usize % 64, 0);
        buf.ensure(3);
        assert_eq!(buf.len(), 40);
        assert!(AlignedBuf::default().is_empty());
    }
}
