//! What a previous run left in the spool, written before the gateway listens (see `mod.rs`):
//! from where the progress stored with the rows says, to the last whole frame.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::frame::{decode_frames, Names};
use super::{read_range, write_part, HEADER, MAGIC, ROWS};
use crate::records::{sqlite, StoreError};

/// Writes what the file holds past the progress stored with the rows; returns the generation
/// to continue with and how many records were written.
pub(super) fn recover(file: &File, pool: &sqlite::Pool) -> Result<(u64, u64), StoreError> {
    let (meta_generation, meta_offset) = sqlite::spool_progress(pool)?;
    let len = file.metadata().map_err(StoreError::failed)?.len();
    let mut head = [0u8; HEADER as usize];
    let header = if len >= HEADER && file.read_exact_at(&mut head, 0).is_ok() {
        // A generation is stored as an SQLite integer: one past i64's range is not ours.
        (&head[..8] == MAGIC)
            .then(|| u64::from_le_bytes(head[8..].try_into().unwrap_or([0; 8])))
            .filter(|&g| g < i64::MAX as u64 / 2)
    } else {
        None
    };
    let Some(generation) = header else {
        if len > 0 {
            log::warn!("a record spool without a readable header ({len} bytes) was emptied");
        }
        return Ok((meta_generation.saturating_add(1), 0));
    };
    let mut at = if generation == meta_generation {
        meta_offset.max(HEADER)
    } else {
        HEADER
    };
    let mut written = 0;
    let mut names = Names::default();
    while at < len {
        let bytes = read_range(file, at, len).map_err(StoreError::failed)?;
        let (mut records, ends, cut) = decode_frames(&bytes, at, &mut names);
        drop(bytes);
        let mut done = 0;
        while done < records.len() {
            let n = ROWS.min(records.len() - done);
            let upto = ends[done + n - 1];
            // Rows the database refuses would be refused at every start: dropped, as while
            // running.
            if write_part(pool, &mut records[done..done + n], (generation, upto))? {
                written += n as u64;
            }
            at = upto;
            done += n;
        }
        if cut.is_some() || done == 0 {
            log::warn!(
                "{} bytes at the end of the record spool could not be read (a write cut by a \
                 crash); dropped",
                len - at
            );
            break;
        }
    }
    Ok((generation.max(meta_generation).saturating_add(1), written))
}
