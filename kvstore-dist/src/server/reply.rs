//! Answers to requests: one part's own message, or an item of a batch answered as a whole;
//! what a request is answered with (a part's value, some of its rows, an acknowledgement).

use std::sync::{Arc, Mutex};

use kvstore_base::NDArray;

use crate::protocol::{self, RowRequest, ShmSlot};
use crate::shm::Region;
use crate::transport::{Outgoing, Responder};

/// Where the answer for one part goes.
pub(crate) enum Answer {
    /// The part came in a message of its own.
    One(Responder),
    /// The part is item `.1` of a batch.
    Item(Arc<Batch>, usize),
    /// The part came in a message of its own whose data goes to a slot of the worker's
    /// shared-memory region.
    Shm(Responder, Arc<Region>, ShmSlot),
}

impl Answer {
    /// Answers with `data` (empty for an acknowledgement).
    pub(crate) fn ok(self, data: &[u8]) {
        match self {
            Answer::One(r) => {
                let _ = r.respond(Outgoing::new(0, data));
            }
            Answer::Item(batch, i) => batch.complete(i, Ok(data)),
            Answer::Shm(r, _, _) if data.is_empty() => {
                let _ = r.respond(Outgoing::new(0, &[]));
            }
            Answer::Shm(r, region, slot) => {
                let written = if data.len() as u64 != slot.len {
                    Err(format!(
                        "the part holds {} bytes but the worker's reply slot has {}",
                        data.len(),
                        slot.len
                    ))
                } else {
                    region.copy_in(slot.offset, data)
                };
                let _ = match written {
                    Ok(()) => r.respond(Outgoing::new(0, &[]).flags(protocol::FLAG_SHM_REPLY)),
                    Err(e) => r.respond_error(&e),
                };
            }
        }
    }

    /// Answers with an error.
    pub(crate) fn fail(self, message: &str) {
        match self {
            Answer::One(r) => {
                let _ = r.respond_error(message);
            }
            Answer::Item(batch, i) => batch.complete(i, Err(message)),
            Answer::Shm(r, _, _) => {
                let _ = r.respond_error(message);
            }
        }
    }

    /// Whether this answer is a message of its own (and may go out on another thread).
    pub(crate) fn is_one(&self) -> bool {
        matches!(self, Answer::One(_) | Answer::Shm(..))
    }
}

struct BatchState {
    responder: Option<Responder>,
    remaining: usize,
    /// Byte range of each item's data in `buf` (empty for items that answer no data).
    ranges: Vec<std::ops::Range<usize>>,
    /// Items whose size was unknown when the batch began (a pulled part without its value
    /// yet): data answering one is an error, not silently dropped.
    size_unknown: Vec<bool>,
    buf: Vec<u8>,
    error: Option<String>,
}

/// A batch of parts answered by one message once every item is answered: the items' data in
/// item order, or the first failed item's error.
pub(crate) struct Batch {
    state: Mutex<BatchState>,
}

impl Batch {
    /// A batch whose item `i` answers `lens[i]` bytes; `None`: a size not known (the item is
    /// expected to fail, and answers no data).
    pub(crate) fn new(responder: Responder, lens: &[Option<usize>]) -> Arc<Batch> {
        let mut ranges = Vec::with_capacity(lens.len());
        let mut at = 0;
        for len in lens {
            let len = len.unwrap_or(0);
            ranges.push(at..at + len);
            at += len;
        }
        let size_unknown = lens.iter().map(Option::is_none).collect();
        Arc::new(Batch {
            state: Mutex::new(BatchState {
                responder: Some(responder),
                remaining: lens.len(),
                ranges,
                size_unknown,
                buf: vec![0; at],
                error: None,
            }),
        })
    }

    fn complete(&self, i: usize, outcome: Result<&[u8], &str>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let range = st.ranges[i].clone();
        match outcome {
            Ok(data) if st.size_unknown[i] && !data.is_empty() => {
                let msg = "the part got its value while the batch was under way (a push of the \
                           item, if any, was applied): pull it again";
                st.error.get_or_insert(protocol::item_error(i, msg));
            }
            Ok(_) if range.is_empty() => {}
            Ok(data) if data.len() == range.len() => st.buf[range].copy_from_slice(data),
            Ok(data) => {
                let msg = format!(
                    "the part holds {} bytes but the worker expected {}",
                    data.len(),
                    range.len()
                );
                st.error.get_or_insert(protocol::item_error(i, &msg));
            }
            Err(message) => {
                st.error.get_or_insert(protocol::item_error(i, message));
            }
        }
        st.remaining -= 1;
        if st.remaining > 0 {
            return;
        }
        let Some(responder) = st.responder.take() else {
            return;
        };
        let _ = match &st.error {
            Some(e) => responder.respond_error(e),
            None => responder.respond(Outgoing::new(0, &st.buf)),
        };
    }
}

/// What a request is answered with once its part is ready.
pub(crate) enum Wants {
    /// An empty acknowledgement (a sync push).
    Ack,
    /// The part's value (a pushpull, a pull).
    Value,
    /// Some rows of the part (a row-sparse pull).
    Rows(RowRequest),
}

impl Wants {
    /// Answers `answer` from the part's `value`.
    pub(crate) fn answer(&self, answer: Answer, value: &NDArray) {
        match self {
            Wants::Ack => answer.ok(&[]),
            Wants::Value => answer.ok(value.as_bytes().expect("stored parts are contiguous")),
            Wants::Rows(request) => match rows_in(value, request) {
                Ok(rows) => answer.ok(&rows),
                Err(e) => answer.fail(&e),
            },
        }
    }
}

/// The elements of the rows `request` names that lie in the part `value` (a row cut by the
/// part's ends contributes the elements inside it), in the order named.
fn rows_in(value: &NDArray, request: &RowRequest) -> Result<Vec<u8>, String> {
    let bytes = value.as_bytes().expect("stored parts are contiguous");
    let size = value.dtype().size_of() as u64;
    let part_end = request
        .part_start
        .checked_add(value.size() as u64)
        .ok_or_else(|| {
            format!(
                "a part starting at element {} cannot exist",
                request.part_start
            )
        })?;
    // The rows are strictly increasing (checked when decoded): at most the part comes back.
    let wanted = (request.rows.len() as u64).saturating_mul(request.row_len.saturating_mul(size));
    let mut out = Vec::with_capacity(wanted.min(bytes.len() as u64) as usize);
    for &row in &request.rows {
        let row = u64::try_from(row).map_err(|_| format!("negative row id {row}"))?;
        if let Some((a, b)) =
            protocol::row_in_part(row, request.row_len, request.part_start, part_end)
        {
            out.extend_from_slice(&bytes[(a * size) as usize..(b * size) as usize]);
        }
    }
    Ok(out)
}
