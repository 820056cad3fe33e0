//! A JPEG decoder that reproduces what PIL's `Image.open(...).convert("RGB")` returns, bit for bit: PIL decodes
//! with libjpeg-turbo's defaults (ISLOW integer IDCT, fancy upsampling, table-driven YCbCr -> RGB), and the HF
//! image processor resizes those exact pixels. The `image` crate's decoder (zune-jpeg) uses another IDCT, another
//! upsampler and other colour constants; on the FairFace crops it differs by up to 6 levels before the resize and
//! up to 7 after it, so the model would see different inputs. Hence this module.
//!
//! Scope: Huffman-coded 8-bit baseline, extended sequential and progressive JPEG with 1 or 3 components, any
//! integral sampling factors, restart markers. Anything else (arithmetic coding, 12-bit, lossless, CMYK/YCCK) is
//! reported as `Unsupported` so the caller can fall back to the `image` crate.
//!
//! Coefficients of all scans go into one buffer per component; the IDCT then runs per block row in parallel, and
//! upsampling + colour conversion per output row in parallel.

mod color;
mod huffman;
mod idct;

use rayon::prelude::*;

use color::{ColorSpace, Plane};
use huffman::{BitReader, HuffTable};

/// More scans than any encoder writes (libjpeg-turbo's own tools cap at 500 too): bounds the work a crafted
/// progressive file can demand.
const MAX_SCANS: usize = 500;

#[derive(Debug)]
pub(crate) enum JpegError {
    /// Valid JPEG this decoder does not handle; the caller may try another decoder.
    Unsupported(String),
    Invalid(String),
    Truncated,
    TooLarge {
        width: usize,
        height: usize,
    },
}

/// What the header says, read without touching the entropy-coded data.
pub(crate) struct Header {
    pub width: usize,
    pub height: usize,
}

pub(crate) struct Decoded {
    pub width: usize,
    pub height: usize,
    /// Planar RGB: the R, G and B planes of `width * height` bytes, one after the other.
    pub rgb: Vec<u8>,
    /// Payloads of the APP1 "Exif" segments before the first scan, concatenated the way PIL does.
    pub exif: Option<Vec<u8>>,
    /// Payload of the last APP1 XMP segment before the first scan (PIL keeps the last one).
    pub xmp: Option<Vec<u8>>,
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks holding real samples: ceil(ceil(width * h / max_h) / 8).
    bw: usize,
    bh: usize,
    /// Blocks allocated: whole MCUs.
    aw: usize,
    ah: usize,
    coefs: Vec<i16>,
    /// Quantization table latched at the component's first scan, as libjpeg does.
    quant: Option<[i16; 64]>,
    dc_pred: i32,
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    comps: Vec<Component>,
    max_h: usize,
    max_v: usize,
    mcux: usize,
    mcuy: usize,
}

#[derive(Default)]
struct Tables {
    quant: [Option<[i16; 64]>; 4],
    dc: [Option<HuffTable>; 4],
    ac: [Option<HuffTable>; 4],
    restart_interval: usize,
}

struct Markers {
    jfif: bool,
    adobe_transform: Option<u8>,
    exif: Option<Vec<u8>>,
    xmp: Option<Vec<u8>>,
}

fn be16(d: &[u8], p: usize) -> Option<usize> {
    Some(((*d.get(p)? as usize) << 8) | *d.get(p + 1)? as usize)
}

/// Finds the next marker at or after `p` (skipping garbage and fill bytes): returns (marker code, position of
/// the byte after it).
fn next_marker(d: &[u8], mut p: usize) -> Option<(u8, usize)> {
    loop {
        while *d.get(p)? != 0xFF {
            p += 1;
        }
        while *d.get(p)? == 0xFF {
            p += 1;
        }
        let m = *d.get(p)?;
        if m != 0 {
            return Some((m, p + 1));
        }
        p += 1;
    }
}

/// A marker segment's payload (after the 2-byte length) and the position after it.
fn segment(d: &[u8], p: usize) -> Result<(&[u8], usize), JpegError> {
    let len = be16(d, p).ok_or(JpegError::Truncated)?;
    if len < 2 {
        return Err(JpegError::Invalid(format!("marker segment length {len}")));
    }
    let body = d.get(p + 2..p + len).ok_or(JpegError::Truncated)?;
    Ok((body, p + len))
}

fn parse_frame(body: &[u8], progressive: bool) -> Result<Frame, JpegError> {
    let bad = |m: &str| JpegError::Invalid(format!("bad SOF: {m}"));
    if body.len() < 6 {
        return Err(bad("too short"));
    }
    let precision = body[0];
    let height = be16(body, 1).ok_or_else(|| bad("too short"))?;
    let width = be16(body, 3).ok_or_else(|| bad("too short"))?;
    let n = body[5] as usize;
    if precision != 8 {
        return Err(JpegError::Unsupported(format!("{precision}-bit samples")));
    }
    if height == 0 {
        return Err(JpegError::Unsupported("height defined by a DNL marker".into()));
    }
    if width == 0 {
        return Err(bad("zero width"));
    }
    if n == 0 || body.len() < 6 + 3 * n {
        return Err(bad("component list"));
    }
    if n != 1 && n != 3 {
        return Err(JpegError::Unsupported(format!("{n} components")));
    }
    let mut comps = Vec::with_capacity(n);
    for i in 0..n {
        let c = &body[6 + 3 * i..9 + 3 * i];
        let (h, v, tq) = ((c[1] >> 4) as usize, (c[1] & 15) as usize, c[2] as usize);
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) || tq > 3 {
            return Err(bad("sampling factor or quantization table index"));
        }
        comps.push(Component {
            id: c[0],
            h,
            v,
            tq,
            bw: 0,
            bh: 0,
            aw: 0,
            ah: 0,
            coefs: Vec::new(),
            quant: None,
            dc_pred: 0,
        });
    }
    // A single-component frame is coded one block per MCU whatever its sampling factors say.
    if n == 1 {
        comps[0].h = 1;
        comps[0].v = 1;
    }
    let max_h = comps.iter().map(|c| c.h).max().unwrap_or(1);
    let max_v = comps.iter().map(|c| c.v).max().unwrap_or(1);
    let mcux = width.div_ceil(8 * max_h);
    let mcuy = height.div_ceil(8 * max_v);
    for c in &mut comps {
        c.bw = (width * c.h).div_ceil(max_h).div_ceil(8);
        c.bh = (height * c.v).div_ceil(max_v).div_ceil(8);
        c.aw = mcux * c.h;
        c.ah = mcuy * c.v;
    }
    Ok(Frame { width, height, progressive, comps, max_h, max_v, mcux, mcuy })
}

fn parse_dqt(body: &[u8], tables: &mut Tables) -> Result<(), JpegError> {
    let mut p = 0;
    while p < body.len() {
        let pq = body[p] >> 4;
        let tq = (body[p] & 15) as usize;
        if tq > 3 || pq > 1 {
            return Err(JpegError::Invalid("bad DQT".into()));
        }
        p += 1;
        let mut q = [0i16; 64];
        for k in 0..64 {
            let v = if pq == 0 {
                *body.get(p + k).ok_or(JpegError::Truncated)? as u16
            } else {
                be16(body, p + 2 * k).ok_or(JpegError::Truncated)? as u16
            };
            // libjpeg keeps 16-bit multipliers as `short`.
            q[huffman::NATURAL[k]] = v as i16;
        }
        p += if pq == 0 { 64 } else { 128 };
        tables.quant[tq] = Some(q);
    }
    Ok(())
}

fn parse_dht(body: &[u8], tables: &mut Tables) -> Result<(), JpegError> {
    let mut p = 0;
    while p < body.len() {
        let tc = body[p] >> 4;
        let th = (body[p] & 15) as usize;
        if tc > 1 || th > 3 {
            return Err(JpegError::Invalid("bad DHT".into()));
        }
        let counts: [u8; 16] =
            body.get(p + 1..p + 17).ok_or(JpegError::Truncated)?.try_into().map_err(|_| JpegError::Truncated)?;
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let values = body.get(p + 17..p + 17 + total).ok_or(JpegError::Truncated)?;
        let table = HuffTable::new(&counts, values, tc == 0)?;
        if tc == 0 {
            tables.dc[th] = Some(table);
        } else {
            tables.ac[th] = Some(table);
        }
        p += 17 + total;
    }
    Ok(())
}

struct Scan {
    /// (component index, DC table, AC table) in scan order.
    comps: Vec<(usize, usize, usize)>,
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

fn parse_sos(body: &[u8], frame: &Frame) -> Result<Scan, JpegError> {
    let bad = |m: &str| JpegError::Invalid(format!("bad SOS: {m}"));
    let n = *body.first().ok_or_else(|| bad("empty"))? as usize;
    if !(1..=4).contains(&n) || body.len() < 1 + 2 * n + 3 {
        return Err(bad("component count"));
    }
    let mut comps = Vec::with_capacity(n);
    for i in 0..n {
        let id = body[1 + 2 * i];
        let t = body[2 + 2 * i];
        let ci = frame.comps.iter().position(|c| c.id == id).ok_or_else(|| bad("unknown component"))?;
        if comps.iter().any(|&(c, _, _)| c == ci) {
            return Err(bad("duplicate component"));
        }
        let (td, ta) = ((t >> 4) as usize, (t & 15) as usize);
        if td > 3 || ta > 3 {
            return Err(bad("table index"));
        }
        comps.push((ci, td, ta));
    }
    let p = 1 + 2 * n;
    let (ss, se, ah, al) =
        (body[p] as usize, body[p + 1] as usize, (body[p + 2] >> 4) as u32, (body[p + 2] & 15) as u32);
    if frame.progressive {
        let dc = ss == 0;
        if (dc && se != 0) || (!dc && (ss > se || se > 63 || n != 1)) || al > 13 || ah > 13 {
            return Err(bad("progression parameters"));
        }
    } else if ss != 0 || se != 63 || ah != 0 || al != 0 {
        return Err(bad("sequential scan must cover 0..63"));
    }
    let blocks_per_mcu: usize = comps.iter().map(|&(c, _, _)| frame.comps[c].h * frame.comps[c].v).sum();
    if n > 1 && blocks_per_mcu > 10 {
        return Err(bad("more than 10 blocks per MCU"));
    }
    Ok(Scan { comps, ss, se, ah, al })
}

/// Decodes one scan's entropy-coded data starting at `pos`; returns the position of the marker that ends it.
fn decode_scan(data: &[u8], pos: usize, frame: &mut Frame, tables: &Tables, scan: &Scan) -> Result<usize, JpegError> {
    for &(ci, td, ta) in &scan.comps {
        let c = &mut frame.comps[ci];
        if c.quant.is_none() {
            c.quant =
                Some(tables.quant[c.tq].ok_or_else(|| JpegError::Invalid("quantization table not defined".into()))?);
        }
        let need_dc = !frame.progressive || (scan.ss == 0 && scan.ah == 0);
        let need_ac = !frame.progressive || scan.ss > 0;
        if need_dc && tables.dc[td].is_none() || need_ac && tables.ac[ta].is_none() {
            return Err(JpegError::Invalid("Huffman table not defined".into()));
        }
        c.dc_pred = 0;
    }
    let empty = HuffTable::new(&[0; 16], &[], false)?;
    let dc_of = |td: usize| tables.dc[td].as_ref().unwrap_or(&empty);
    let ac_of = |ta: usize| tables.ac[ta].as_ref().unwrap_or(&empty);

    let mut br = BitReader::new(data, pos);
    let mut eobrun = 0u32;
    let single = scan.comps.len() == 1;
    let (mcus_x, total) = if single {
        let c = &frame.comps[scan.comps[0].0];
        (c.bw, c.bw * c.bh)
    } else {
        (frame.mcux, frame.mcux * frame.mcuy)
    };
    let interval = tables.restart_interval;

    for mcu in 0..total {
        if interval > 0 && mcu > 0 && mcu % interval == 0 {
            // Bits read past a marker are corrupt data (libjpeg warns, PIL ignores it, the zeros stay); past
            // the end of the file they are missing data, which PIL reports as a truncated file.
            if br.overran && br.at_eof {
                return Err(JpegError::Truncated);
            }
            match br.finish() {
                Some(m) if (0xD0..=0xD7).contains(&m) => br.skip_marker(),
                Some(_) => {}
                None => return Err(JpegError::Truncated),
            }
            for &(ci, _, _) in &scan.comps {
                frame.comps[ci].dc_pred = 0;
            }
            eobrun = 0;
        }
        let (mx, my) = (mcu % mcus_x, mcu / mcus_x);
        for &(ci, td, ta) in &scan.comps {
            let c = &mut frame.comps[ci];
            let (bh, bv) = if single { (1, 1) } else { (c.h, c.v) };
            for v in 0..bv {
                for h in 0..bh {
                    let (bx, by) = (mx * bh + h, my * bv + v);
                    let off = (by * c.aw + bx) * 64;
                    let block = &mut c.coefs[off..off + 64];
                    match (frame.progressive, scan.ss == 0, scan.ah == 0) {
                        (false, _, _) => huffman::decode_block(&mut br, block, dc_of(td), ac_of(ta), &mut c.dc_pred),
                        (true, true, true) => {
                            huffman::decode_dc_first(&mut br, block, dc_of(td), &mut c.dc_pred, scan.al)
                        }
                        (true, true, false) => huffman::decode_dc_refine(&mut br, block, scan.al),
                        (true, false, true) => {
                            huffman::decode_ac_first(&mut br, block, ac_of(ta), scan.ss, scan.se, scan.al, &mut eobrun)
                        }
                        (true, false, false) => {
                            huffman::decode_ac_refine(&mut br, block, ac_of(ta), scan.ss, scan.se, scan.al, &mut eobrun)
                        }
                    }
                }
            }
        }
    }
    if br.overran && br.at_eof {
        return Err(JpegError::Truncated);
    }
    Ok(match br.finish() {
        Some(_) => br.pos,
        None => data.len(),
    })
}

fn parse_markers_until_frame(data: &[u8]) -> Result<(), JpegError> {
    if data.len() < 2 || data[0] != 0xFF || data[1] != 0xD8 {
        return Err(JpegError::Invalid("missing SOI marker".into()));
    }
    Ok(())
}

/// Reads the frame header only (for the pixel limit check before any decoding).
pub(crate) fn read_header(data: &[u8]) -> Result<Header, JpegError> {
    parse_markers_until_frame(data)?;
    let mut p = 2;
    loop {
        let (m, q) = next_marker(data, p).ok_or(JpegError::Truncated)?;
        match m {
            0xC0..=0xC2 => {
                let (body, _) = segment(data, q)?;
                let f = parse_frame(body, m == 0xC2)?;
                return Ok(Header { width: f.width, height: f.height });
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(JpegError::Unsupported(format!("SOF{} (lossless, hierarchical or arithmetic)", m - 0xC0)));
            }
            0xD9 | 0xDA => return Err(JpegError::Invalid("no frame header before the image data".into())),
            0xD0..=0xD7 | 0x01 => p = q,
            _ => p = segment(data, q)?.1,
        }
    }
}

/// Decodes a whole JPEG file to RGB, refusing frames of more than `max_pixels` before allocating for them.
pub(crate) fn decode(data: &[u8], max_pixels: u64) -> Result<Decoded, JpegError> {
    parse_markers_until_frame(data)?;
    let mut tables = Tables::default();
    let mut markers = Markers { jfif: false, adobe_transform: None, exif: None, xmp: None };
    let mut frame: Option<Frame> = None;
    let mut scans = 0usize;
    let mut saw_eoi = false;
    // libjpeg buffers the whole image when it needs more than one scan, and then insists on reading to EOI.
    let mut multi_scan = false;
    let mut p = 2;
    while let Some((m, q)) = next_marker(data, p) {
        match m {
            0xD8 => return Err(JpegError::Invalid("second SOI marker".into())),
            0xD9 => {
                saw_eoi = true;
                break;
            }
            0xD0..=0xD7 | 0x01 => {
                p = q;
                continue;
            }
            _ => {}
        }
        let (body, next) = segment(data, q)?;
        match m {
            0xC0..=0xC2 => {
                if frame.is_some() {
                    return Err(JpegError::Invalid("more than one frame".into()));
                }
                let mut f = parse_frame(body, m == 0xC2)?;
                if (f.width as u64) * (f.height as u64) > max_pixels {
                    return Err(JpegError::TooLarge { width: f.width, height: f.height });
                }
                for c in &mut f.comps {
                    c.coefs = vec![0i16; c.aw * c.ah * 64];
                }
                frame = Some(f);
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(JpegError::Unsupported(format!("SOF{} (lossless, hierarchical or arithmetic)", m - 0xC0)));
            }
            0xC4 => parse_dht(body, &mut tables)?,
            0xDB => parse_dqt(body, &mut tables)?,
            0xDD => {
                tables.restart_interval = be16(body, 0).ok_or(JpegError::Truncated)?;
            }
            0xDC => return Err(JpegError::Unsupported("DNL marker".into())),
            0xE0 if scans == 0 && body.len() >= 14 && &body[..5] == b"JFIF\0" => markers.jfif = true,
            0xE1 if scans == 0 && body.starts_with(b"Exif\0\0") => match &mut markers.exif {
                Some(e) => e.extend_from_slice(&body[6..]),
                None => markers.exif = Some(body.to_vec()),
            },
            0xE1 if scans == 0 && body.starts_with(b"http://ns.adobe.com/xap/1.0/\0") => {
                markers.xmp = Some(body[29..].to_vec());
            }
            0xEE if scans == 0 && body.len() >= 12 && &body[..5] == b"Adobe" => {
                markers.adobe_transform = Some(body[11])
            }
            0xDA => {
                let f = frame.as_mut().ok_or_else(|| JpegError::Invalid("scan before frame header".into()))?;
                scans += 1;
                if scans > MAX_SCANS {
                    return Err(JpegError::Invalid(format!("more than {MAX_SCANS} scans")));
                }
                let scan = parse_sos(body, f)?;
                multi_scan |= f.progressive || scan.comps.len() < f.comps.len();
                p = decode_scan(data, next, f, &tables, &scan)?;
                continue;
            }
            _ => {}
        }
        p = next;
    }
    let mut frame = frame.ok_or_else(|| JpegError::Invalid("no frame header".into()))?;
    if scans == 0 {
        return Err(JpegError::Truncated);
    }
    // A multi-scan file cut between scans has every block, but PIL (libjpeg suspending on the missing data)
    // reports it as truncated; a single-scan file may lack EOI once all its data is there.
    if multi_scan && !saw_eoi {
        return Err(JpegError::Truncated);
    }
    let space = if frame.comps.len() == 1 {
        ColorSpace::Gray
    } else if markers.jfif {
        ColorSpace::YCbCr
    } else if let Some(t) = markers.adobe_transform {
        if t == 0 {
            ColorSpace::Rgb
        } else {
            ColorSpace::YCbCr
        }
    } else {
        let ids: Vec<u8> = frame.comps.iter().map(|c| c.id).collect();
        if ids == [82, 71, 66] {
            ColorSpace::Rgb
        } else {
            ColorSpace::YCbCr
        }
    };
    let rgb = reconstruct(&mut frame, space)?;
    Ok(Decoded { width: frame.width, height: frame.height, rgb, exif: markers.exif, xmp: markers.xmp })
}

/// IDCT every component into a sample plane, then upsample and colour-convert.
fn reconstruct(frame: &mut Frame, space: ColorSpace) -> Result<Vec<u8>, JpegError> {
    for c in &frame.comps {
        if !frame.max_h.is_multiple_of(c.h) || !frame.max_v.is_multiple_of(c.v) {
            return Err(JpegError::Unsupported("fractional sampling ratio".into()));
        }
    }
    // Each component's coefficients are freed as soon as its samples exist, to keep the peak memory of large
    // images down.
    let samples: Vec<Vec<u8>> = frame
        .comps
        .iter_mut()
        .map(|c| {
            let stride = c.aw * 8;
            let mut plane = vec![0u8; stride * c.ah * 8];
            let quant = c.quant.unwrap_or([0; 64]);
            let coefs = std::mem::take(&mut c.coefs);
            plane.par_chunks_mut(stride * 8).enumerate().for_each(|(by, rows)| {
                for bx in 0..c.aw {
                    let off = (by * c.aw + bx) * 64;
                    idct::idct_islow(&coefs[off..off + 64], &quant, &mut rows[bx * 8..], stride);
                }
            });
            plane
        })
        .collect();
    let planes: Vec<Plane> = frame
        .comps
        .iter()
        .zip(&samples)
        .map(|(c, data)| Plane {
            data,
            stride: c.aw * 8,
            width: (frame.width * c.h).div_ceil(frame.max_h),
            height: (frame.height * c.v).div_ceil(frame.max_v),
            hx: frame.max_h / c.h,
            vy: frame.max_v / c.v,
        })
        .collect();
    color::to_rgb(&planes, space, frame.width, frame.height)
}
