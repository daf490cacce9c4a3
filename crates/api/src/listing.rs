//! Safe listing: pages in a view (AIP-157) and capped by bytes as well as rows.
//!
//! A page of 1000 rows at 300 KiB each was larger than any gRPC message, so no client
//! could list past it, and the replica first held the whole page in memory. Lists
//! now show the BASIC view unless asked for FULL (payload and description are not even
//! read), a page ends before its encoded size passes `max_page_bytes` (its token
//! continues right after the last task sent), and a FULL page is read in small chunks so
//! memory follows the byte cap, not the row count.

use prost::Message as _;
use taskpod_core::store::query::page_size;
use taskpod_core::store::{Cursor, ListQuery, Store, TaskFilter, TaskOrder, View};
use taskpod_core::{Error, domain::Task};
use taskpod_proto::convert;
use taskpod_proto::v1;

/// Rows read per round trip for a FULL page: at most ~340 KiB each (payload,
/// description, metadata at their limits), so a chunk stays near 17 MiB at worst.
const FULL_CHUNK: usize = 50;

/// The view a request asked for; UNSPECIFIED is BASIC, as lists default to.
///
/// # Errors
/// [`Error::InvalidArgument`] on `view` for a number the enum does not name.
pub fn view_of(requested: i32) -> Result<View, Error> {
    match v1::TaskView::try_from(requested) {
        Ok(v1::TaskView::Unspecified | v1::TaskView::Basic) => Ok(View::Basic),
        Ok(v1::TaskView::Full) => Ok(View::Full),
        Err(_) => Err(Error::InvalidArgument {
            field: "view".into(),
            reason: format!("{requested} is not a TaskView (0, 1 or 2)"),
        }),
    }
}

/// `task` as `view` shows it on the wire.
pub fn shown(task: &Task, view: View) -> v1::Task {
    let mut t = convert::task(task);
    if view == View::Basic {
        t.payload = None;
        t.description.clear();
    }
    t
}

/// What one page request asks for.
#[derive(Debug)]
pub struct PageRequest {
    pub filter: TaskFilter,
    pub order: TaskOrder,
    /// As the client sent it (0 is the default, above the maximum is clamped).
    pub page_size: i64,
    pub after: Option<Cursor>,
    pub view: View,
    /// The page's encoded size stays under this, unless one task alone is larger.
    pub max_bytes: usize,
}

/// One page as the wire shows it, and where the next starts (`None`: the last page).
#[derive(Debug)]
pub struct Shown {
    pub tasks: Vec<v1::Task>,
    pub next: Option<Cursor>,
}

/// Reads one page, ending it at the row limit, the byte limit or the end.
///
/// # Errors
/// [`Error::InvalidArgument`] for a negative page size or a cursor of another order;
/// [`Error::StoreUnavailable`].
pub async fn read_page(store: &Store, req: PageRequest) -> Result<Shown, Error> {
    let limit = page_size(req.page_size)?;
    let chunk = match req.view {
        View::Full => limit.min(FULL_CHUNK),
        View::Basic => limit,
    };
    let mut tasks = Vec::new();
    let mut bytes = 0usize;
    // Where the page continues if it ends after the last task sent.
    let mut last_sent: Option<Cursor> = None;
    let mut after = req.after;
    loop {
        let want = chunk.min(limit - tasks.len());
        let page = store
            .list_tasks(&ListQuery {
                filter: req.filter.clone(),
                order: req.order,
                page_size: want as i64,
                after,
                view: req.view,
            })
            .await?;
        for task in &page.tasks {
            let t = shown(task, req.view);
            // The field's own framing: a tag byte and the length's varint.
            let len = t.encoded_len();
            let framed = 1 + prost::length_delimiter_len(len) + len;
            if !tasks.is_empty() && bytes + framed > req.max_bytes {
                return Ok(Shown {
                    next: last_sent,
                    tasks,
                });
            }
            bytes += framed;
            tasks.push(t);
            last_sent = Some(Cursor::after(req.order, task));
        }
        match page.next {
            None => return Ok(Shown { tasks, next: None }),
            Some(next) if tasks.len() >= limit => {
                return Ok(Shown {
                    tasks,
                    next: Some(next),
                });
            }
            Some(next) => after = Some(next),
        }
    }
}
