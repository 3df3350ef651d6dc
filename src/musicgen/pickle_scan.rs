//! A shape check of a pickle stream before Candle's reader builds objects from it.
//!
//! Candle's reader is iterative, but the objects it builds are dropped, cloned and
//! printed recursively, and it sizes buffers from length fields: a pickle nested 200,000
//! levels deep overflows the stack, a `BINUNICODE` claiming 4 GB allocates 4 GB, and memo
//! references (`BINGET`, deep-cloned by the reader) can grow a small file exponentially.
//! This pass mirrors the reader's stack with only each object's depth and node count,
//! over the opcodes that reader knows, and refuses a stream whose objects would be too
//! deep or too large, or whose length fields run past its end. A real checkpoint's pickle
//! is a dict of a few thousand tensor records, about five levels deep.

use anyhow::{bail, Result};

/// Deepest object accepted (a state dict is about 5 levels deep).
pub const MAX_DEPTH: u32 = 1000;
/// Most objects (counting each memo reference as the copy the reader makes) accepted.
pub const MAX_NODES: u64 = 20_000_000;

#[derive(Clone, Copy)]
enum Slot {
    Mark,
    Obj { depth: u32, nodes: u64 },
}

const LEAF: Slot = Slot::Obj { depth: 1, nodes: 1 };

struct Scan<'a> {
    data: &'a [u8],
    at: usize,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u32, Slot>,
}

/// Checks a pickle stream (see the module documentation). Opcodes the reader does not
/// know end the scan: the reader then refuses the stream itself, holding only what was
/// checked so far.
pub fn check(data: &[u8]) -> Result<()> {
    let mut s = Scan { data, at: 0, stack: Vec::new(), memo: Default::default() };
    while s.at < data.len() {
        let op = data[s.at];
        s.at += 1;
        match op {
            0x80 => s.skip(1)?, // PROTO
            b'c' => {
                s.line()?;
                s.line()?;
                s.push(LEAF)?;
            } // GLOBAL
            b'q' => s.put(1)?,  // BINPUT
            b'r' => s.put(4)?,  // LONG_BINPUT
            b')' | b'}' | b']' | b'N' | 0x88 | 0x89 => s.push(LEAF)?, // empty containers, None, bools
            b'R' | 0x81 => s.combine(2)?, // REDUCE, NEWOBJ
            b'(' => s.stack.push(Slot::Mark),
            b'X' => {
                let n = s.len(4)?;
                s.skip(n)?;
                s.push(LEAF)?;
            } // BINUNICODE
            b'J' => s.leaf_arg(4)?, // BININT
            b'K' => s.leaf_arg(1)?, // BININT1
            b'M' => s.leaf_arg(2)?, // BININT2
            b'G' => s.leaf_arg(8)?, // BINFLOAT
            0x8a => {
                let n = s.len(1)?;
                s.skip(n)?;
                s.push(LEAF)?;
            } // LONG1
            b't' | b'd' => s.collect_to_mark()?, // TUPLE, DICT
            0x85 => s.combine(1)?,  // TUPLE1
            0x86 => s.combine(2)?,  // TUPLE2
            0x87 => s.combine(3)?,  // TUPLE3
            b'Q' => s.combine(1)?,  // BINPERSID
            b'h' => s.get(1)?,      // BINGET
            b'j' => s.get(4)?,      // LONG_BINGET
            b'a' | b'b' => s.add_into(1)?, // APPEND, BUILD
            b's' => s.add_into(2)?, // SETITEM
            b'e' | b'u' => s.add_from_mark()?, // APPENDS, SETITEMS
            b'.' => return Ok(()),  // STOP
            _ => return Ok(()),     // unknown to the reader: it refuses
        }
    }
    Ok(())
}

impl Scan<'_> {
    fn skip(&mut self, n: usize) -> Result<()> {
        if n > self.data.len() - self.at {
            bail!("a length field at byte {} runs past the end of the pickle ({n} bytes claimed)", self.at);
        }
        self.at += n;
        Ok(())
    }

    /// A little-endian unsigned length of `width` bytes.
    fn len(&mut self, width: usize) -> Result<usize> {
        let start = self.at;
        self.skip(width)?;
        let mut v = 0u64;
        for (i, b) in self.data[start..start + width].iter().enumerate() {
            v |= (*b as u64) << (8 * i);
        }
        usize::try_from(v).map_err(|_| anyhow::anyhow!("a length field at byte {start} is too large"))
    }

    fn line(&mut self) -> Result<()> {
        match self.data[self.at..].iter().position(|&b| b == b'\n') {
            Some(p) => {
                self.at += p + 1;
                Ok(())
            }
            None => bail!("an unterminated line at byte {} of the pickle", self.at),
        }
    }

    fn leaf_arg(&mut self, width: usize) -> Result<()> {
        self.skip(width)?;
        self.push(LEAF)
    }

    fn push(&mut self, slot: Slot) -> Result<()> {
        if let Slot::Obj { depth, nodes } = slot {
            if depth > MAX_DEPTH {
                bail!("objects nested deeper than {MAX_DEPTH} levels (byte {}); not a checkpoint", self.at);
            }
            if nodes > MAX_NODES {
                bail!(
                    "more than {MAX_NODES} objects once memo references are expanded (byte {}); not a checkpoint",
                    self.at
                );
            }
        }
        self.stack.push(slot);
        Ok(())
    }

    fn pop_obj(&mut self) -> Option<(u32, u64)> {
        match self.stack.pop()? {
            Slot::Obj { depth, nodes } => Some((depth, nodes)),
            Slot::Mark => Some((1, 1)), // the reader refuses this itself
        }
    }

    /// Pops `n` objects: their greatest depth and total node count (`None` if the stack
    /// runs out, which the reader refuses itself).
    fn pop_n(&mut self, n: usize) -> Option<(u32, u64)> {
        let (mut depth, mut nodes) = (0u32, 0u64);
        for _ in 0..n {
            let (d, c) = self.pop_obj()?;
            depth = depth.max(d);
            nodes = nodes.saturating_add(c);
        }
        Some((depth, nodes))
    }

    /// Pops everything down to the last mark: greatest depth and total node count.
    fn pop_to_mark(&mut self) -> (u32, u64) {
        let (mut depth, mut nodes) = (0u32, 0u64);
        while let Some(Slot::Obj { depth: d, nodes: c }) = self.stack.pop() {
            depth = depth.max(d);
            nodes = nodes.saturating_add(c);
        }
        (depth, nodes)
    }

    /// Pops `n` objects and pushes one holding them.
    fn combine(&mut self, n: usize) -> Result<()> {
        let Some((depth, nodes)) = self.pop_n(n) else { return Ok(()) };
        self.push(Slot::Obj { depth: depth + 1, nodes: nodes.saturating_add(1) })
    }

    /// Pops everything down to the last mark and pushes one object holding it.
    fn collect_to_mark(&mut self) -> Result<()> {
        let (depth, nodes) = self.pop_to_mark();
        self.push(Slot::Obj { depth: depth + 1, nodes: nodes.saturating_add(1) })
    }

    /// Pops `n` objects into the object below them (APPEND, BUILD, SETITEM).
    fn add_into(&mut self, n: usize) -> Result<()> {
        let Some((depth, nodes)) = self.pop_n(n) else { return Ok(()) };
        self.grow_top(depth, nodes)
    }

    /// Pops everything down to the last mark into the object below it (APPENDS, SETITEMS).
    fn add_from_mark(&mut self) -> Result<()> {
        let (depth, nodes) = self.pop_to_mark();
        self.grow_top(depth, nodes)
    }

    fn grow_top(&mut self, depth: u32, nodes: u64) -> Result<()> {
        match self.stack.pop() {
            Some(Slot::Obj { depth: d, nodes: c }) => {
                self.push(Slot::Obj { depth: d.max(depth + 1), nodes: c.saturating_add(nodes) })
            }
            Some(Slot::Mark) => {
                self.stack.push(Slot::Mark);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn put(&mut self, width: usize) -> Result<()> {
        let id = self.len(width)? as u32;
        if let Some(&top) = self.stack.last() {
            self.memo.insert(id, top);
        }
        Ok(())
    }

    fn get(&mut self, width: usize) -> Result<()> {
        let id = self.len(width)? as u32;
        let slot = self.memo.get(&id).copied().unwrap_or(LEAF);
        self.push(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_wide_and_lying_pickles_are_refused_real_shapes_pass() {
        // {"a": [1, 2], "b": ("x",)}: protocol 2, as torch.save writes it.
        let ok = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01K\x02eX\x01\x00\x00\x00bq\x03X\x01\x00\x00\x00x\x85q\x04u.";
        check(ok).unwrap();
        // 200,000 nested lists: `]` then `]a` repeated.
        let mut deep = b"\x80\x02]".to_vec();
        for _ in 0..200_000 {
            deep.extend_from_slice(b"]");
        }
        for _ in 0..200_000 {
            deep.extend_from_slice(b"a");
        }
        deep.push(b'.');
        assert!(format!("{:#}", check(&deep).unwrap_err()).contains("nested deeper"));
        // Nested with marks and tuples instead.
        let mut marks = vec![0x80, 2];
        marks.extend(std::iter::repeat_n(b'(', 5000));
        marks.extend(std::iter::repeat_n(b't', 5000));
        assert!(check(&marks).is_err());
        // Exponential growth through the memo: l = [l, l] repeated.
        let mut bomb = b"\x80\x02]q\x00".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"]h\x00h\x00\x86aq\x00");
        }
        assert!(format!("{:#}", check(&bomb).unwrap_err()).contains("objects"));
        // A string claiming 4 GB in a 20-byte file.
        let lying = b"\x80\x02X\xff\xff\xff\xffabc.";
        assert!(format!("{:#}", check(lying).unwrap_err()).contains("past the end"));
        // The control for depth: 500 levels pass.
        let mut fine = b"\x80\x02]".to_vec();
        fine.extend(std::iter::repeat_n(b']', 500));
        fine.extend(std::iter::repeat_n(b'a', 500));
        fine.push(b'.');
        check(&fine).unwrap();
    }
}
