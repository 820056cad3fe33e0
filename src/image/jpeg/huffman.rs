//! Entropy decoding: the bit reader over an entropy-coded segment, canonical Huffman tables, and the four
//! block decoders (sequential, progressive DC first/refine, AC first/refine) with libjpeg's semantics, including
//! its tolerance of corrupt data (bad codes decode as 0, positions past 63 land on 63, a marker met mid-scan
//! makes the rest of the scan read zero bits) so that damaged files decode the way PIL decodes them.

use super::JpegError;

/// Zigzag position -> natural (row-major) position, with 16 trailing 63s: a corrupt run can push the index past 63
/// and libjpeg's table has the same safety margin, so such writes land on coefficient 63 instead of out of bounds.
pub(super) const NATURAL: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
];

#[inline]
fn natural(k: usize) -> usize {
    NATURAL[k.min(NATURAL.len() - 1)]
}

const LOOKUP_BITS: u32 = 9;

/// A canonical Huffman table (JPEG Annex C) with a 9-bit direct lookup for short codes.
#[derive(Clone)]
pub(super) struct HuffTable {
    /// `(length << 8) | symbol` for codes of at most LOOKUP_BITS bits, 0 when the prefix needs the slow path.
    lookup: Vec<u16>,
    /// Largest code of each length (1..=16), -1 when there is none.
    maxcode: [i32; 18],
    /// `values` index of the first code of each length, minus that code.
    valoffset: [i32; 17],
    values: Vec<u8>,
}

impl HuffTable {
    /// `counts[l]` = number of codes of length l + 1. DC tables may only hold symbols 0..=15 (libjpeg refuses others).
    pub(super) fn new(counts: &[u8; 16], values: &[u8], is_dc: bool) -> Result<Self, JpegError> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total > 256 || total != values.len() {
            return Err(JpegError::Invalid("bad Huffman table (more than 256 codes)".into()));
        }
        if is_dc && values.iter().any(|&v| v > 15) {
            return Err(JpegError::Invalid("bad DC Huffman table (symbol above 15)".into()));
        }
        let mut maxcode = [-1i32; 18];
        let mut valoffset = [0i32; 17];
        let mut lookup = vec![0u16; 1 << LOOKUP_BITS];
        let mut code: u32 = 0;
        let mut k = 0usize;
        for len in 1..=16u32 {
            let n = counts[len as usize - 1] as usize;
            if n > 0 {
                valoffset[len as usize] = k as i32 - code as i32;
                for _ in 0..n {
                    if code >= (1 << len) {
                        return Err(JpegError::Invalid("bad Huffman table (code space overflow)".into()));
                    }
                    if len <= LOOKUP_BITS {
                        let shift = LOOKUP_BITS - len;
                        let first = (code << shift) as usize;
                        let entry = ((len as u16) << 8) | values[k] as u16;
                        lookup[first..first + (1 << shift)].fill(entry);
                    }
                    code += 1;
                    k += 1;
                }
                maxcode[len as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        Ok(HuffTable { lookup, maxcode, valoffset, values: values.to_vec() })
    }
}

/// Reads the bits of one entropy-coded segment. Past its end (a marker, or the end of the file) it supplies zero
/// bits, as libjpeg does, and records whether real data ran out so the caller can tell corruption from truncation.
pub(super) struct BitReader<'a> {
    data: &'a [u8],
    pub(super) pos: usize,
    acc: u64,
    nbits: u32,
    /// Zero bits appended past the end of the segment and still in `acc`, or already consumed.
    padded: u32,
    /// The segment ended at a marker (`pos` points at its 0xFF).
    pub(super) at_marker: bool,
    /// The segment ended at the end of the file.
    pub(super) at_eof: bool,
    /// Bits past the end of real data were consumed by the decoder.
    pub(super) overran: bool,
}

impl<'a> BitReader<'a> {
    pub(super) fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader { data, pos, acc: 0, nbits: 0, padded: 0, at_marker: false, at_eof: false, overran: false }
    }

    fn next_byte(&mut self) -> Option<u8> {
        if self.at_marker || self.at_eof {
            return None;
        }
        let Some(&b) = self.data.get(self.pos) else {
            self.at_eof = true;
            return None;
        };
        if b != 0xFF {
            self.pos += 1;
            return Some(b);
        }
        // 0xFF 0x00 is a stuffed data byte; 0xFF followed by more 0xFF is fill before a marker.
        let mut p = self.pos + 1;
        while self.data.get(p) == Some(&0xFF) {
            p += 1;
        }
        match self.data.get(p) {
            Some(0) => {
                self.pos = p + 1;
                Some(0xFF)
            }
            Some(_) => {
                self.pos = p - 1;
                self.at_marker = true;
                None
            }
            None => {
                self.at_eof = true;
                None
            }
        }
    }

    #[inline]
    fn fill(&mut self) {
        while self.nbits <= 56 {
            let byte = match self.next_byte() {
                Some(b) => b,
                None => {
                    self.padded += 8;
                    0
                }
            };
            self.acc |= (byte as u64) << (56 - self.nbits);
            self.nbits += 8;
        }
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.nbits -= n;
        if self.padded > self.nbits {
            self.overran = true;
        }
    }

    #[inline]
    pub(super) fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.nbits < n {
            self.fill();
        }
        let v = (self.acc >> (64 - n)) as u32;
        self.consume(n);
        v
    }

    #[inline]
    fn bit(&mut self) -> bool {
        self.bits(1) != 0
    }

    #[inline]
    pub(super) fn decode(&mut self, t: &HuffTable) -> u8 {
        if self.nbits < 16 {
            self.fill();
        }
        let entry = t.lookup[(self.acc >> (64 - LOOKUP_BITS)) as usize];
        if entry != 0 {
            self.consume((entry >> 8) as u32);
            return entry as u8;
        }
        for len in (LOOKUP_BITS + 1)..=16 {
            let code = (self.acc >> (64 - len)) as i32;
            if code <= t.maxcode[len as usize] {
                self.consume(len);
                let idx = (t.valoffset[len as usize] + code) as usize;
                return t.values.get(idx).copied().unwrap_or(0);
            }
        }
        // libjpeg warns about a bad code and fakes a zero.
        self.consume(16);
        0
    }

    /// Signed value of an `s`-bit magnitude category (JPEG F.2.2.1 EXTEND).
    #[inline]
    fn receive_extend(&mut self, s: u32) -> i32 {
        if s == 0 {
            return 0;
        }
        let s = s.min(16);
        let v = self.bits(s) as i32;
        if v < (1 << (s - 1)) {
            v - (1 << s) + 1
        } else {
            v
        }
    }

    /// Discards buffered bits and moves to the marker that ends the segment, returning it without consuming it
    /// (None at the end of the file). Bytes of garbage before it are skipped, as libjpeg does with a warning.
    pub(super) fn finish(&mut self) -> Option<u8> {
        self.acc = 0;
        self.nbits = 0;
        self.padded = 0;
        self.at_marker = false;
        let mut p = self.pos;
        loop {
            let b = *self.data.get(p)?;
            if b == 0xFF {
                let mut q = p + 1;
                while self.data.get(q) == Some(&0xFF) {
                    q += 1;
                }
                match self.data.get(q) {
                    Some(0) => p = q + 1,
                    Some(&m) => {
                        self.pos = q - 1;
                        return Some(m);
                    }
                    None => return None,
                }
            } else {
                p += 1;
            }
        }
    }

    /// After `finish` returned a marker: step over it (RSTn inside a scan) and resume reading data.
    pub(super) fn skip_marker(&mut self) {
        self.pos += 2;
        self.at_marker = false;
        self.at_eof = false;
        self.overran = false;
    }
}

/// Sequential (baseline / extended) block: DC difference then run-length AC codes, in natural order.
#[inline]
pub(super) fn decode_block(br: &mut BitReader, block: &mut [i16], dc: &HuffTable, ac: &HuffTable, pred: &mut i32) {
    let t = br.decode(dc) as u32;
    let diff = br.receive_extend(t);
    *pred = pred.wrapping_add(diff);
    block[0] = *pred as i16;
    let mut k = 1usize;
    while k < 64 {
        let rs = br.decode(ac);
        let r = (rs >> 4) as usize;
        let s = (rs & 15) as u32;
        if s != 0 {
            k += r;
            let v = br.receive_extend(s);
            block[natural(k)] = v as i16;
        } else if r == 15 {
            k += 15;
        } else {
            break;
        }
        k += 1;
    }
}

/// Progressive DC scan, first pass (Ah = 0).
#[inline]
pub(super) fn decode_dc_first(br: &mut BitReader, block: &mut [i16], dc: &HuffTable, pred: &mut i32, al: u32) {
    let t = br.decode(dc) as u32;
    let diff = br.receive_extend(t);
    *pred = pred.wrapping_add(diff);
    block[0] = pred.wrapping_shl(al) as i16;
}

/// Progressive DC scan, refinement pass: one more bit of each DC coefficient.
#[inline]
pub(super) fn decode_dc_refine(br: &mut BitReader, block: &mut [i16], al: u32) {
    if br.bit() {
        block[0] |= (1i32 << al) as i16;
    }
}

/// Progressive AC scan, first pass, over zigzag band `ss..=se`; `eobrun` counts blocks left in an end-of-band run.
#[inline]
pub(super) fn decode_ac_first(
    br: &mut BitReader,
    block: &mut [i16],
    ac: &HuffTable,
    ss: usize,
    se: usize,
    al: u32,
    eobrun: &mut u32,
) {
    if *eobrun > 0 {
        *eobrun -= 1;
        return;
    }
    let mut k = ss;
    while k <= se {
        let rs = br.decode(ac);
        let r = (rs >> 4) as u32;
        let s = (rs & 15) as u32;
        if s != 0 {
            k += r as usize;
            let v = br.receive_extend(s);
            block[natural(k)] = v.wrapping_shl(al) as i16;
        } else if r == 15 {
            k += 15;
        } else {
            let mut run = 1u32 << r;
            if r != 0 {
                run += br.bits(r);
            }
            *eobrun = run - 1;
            break;
        }
        k += 1;
    }
}

/// Progressive AC scan, refinement pass (JPEG G.1.2.3): correction bits for coefficients already nonzero,
/// and new coefficients of magnitude 1 << al placed on the r-th zero-history position.
pub(super) fn decode_ac_refine(
    br: &mut BitReader,
    block: &mut [i16],
    ac: &HuffTable,
    ss: usize,
    se: usize,
    al: u32,
    eobrun: &mut u32,
) {
    let p1 = (1i32 << al) as i16;
    let m1 = (-1i32 << al) as i16;
    let refine = |br: &mut BitReader, c: &mut i16| {
        if br.bit() && (*c & p1) == 0 {
            *c = if *c >= 0 { c.wrapping_add(p1) } else { c.wrapping_add(m1) };
        }
    };
    let mut k = ss;
    if *eobrun == 0 {
        while k <= se {
            let rs = br.decode(ac);
            let mut r = (rs >> 4) as i32;
            let s = (rs & 15) as u32;
            let mut newval = 0i16;
            if s != 0 {
                newval = if br.bit() { p1 } else { m1 };
            } else if r != 15 {
                let mut run = 1u32 << r;
                if r != 0 {
                    run += br.bits(r as u32);
                }
                *eobrun = run;
                break;
            }
            loop {
                let c = &mut block[natural(k)];
                if *c != 0 {
                    refine(br, c);
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
                if k > se {
                    break;
                }
            }
            if newval != 0 {
                block[natural(k)] = newval;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= se {
            let c = &mut block[natural(k)];
            if *c != 0 {
                refine(br, c);
            }
            k += 1;
        }
        *eobrun -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rejects_overfull_code_space() {
        let mut counts = [0u8; 16];
        counts[0] = 3; // three 1-bit codes cannot exist
        assert!(HuffTable::new(&counts, &[0, 1, 2], false).is_err());
    }

    #[test]
    fn reader_unstuffs_and_stops_at_marker() {
        // 0xFF00 is a data byte 0xFF; 0xFFD9 ends the segment, after which bits read as zeros.
        let data = [0xA5, 0xFF, 0x00, 0xFF, 0xD9];
        let mut br = BitReader::new(&data, 0);
        assert_eq!(br.bits(8), 0xA5);
        assert_eq!(br.bits(8), 0xFF);
        assert!(!br.overran);
        assert_eq!(br.bits(8), 0);
        assert!(br.overran && br.at_marker && !br.at_eof);
        assert_eq!(br.finish(), Some(0xD9));
    }
}
