//! Runs independent examples on `jobs` workers, each with its own share of the CPU
//! threads (a rayon pool that Candle's and the projector's parallel loops run on).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use anyhow::Result;
use indicatif::ProgressBar;

enum Event {
    Started(String),
    Done,
    Failed(String, String),
}

/// Applies `work` to every item; returns `(label, error)` for the failures, sorted.
/// Results never depend on `jobs`: each item is computed the same way on any worker.
pub fn for_each<T: Sync>(
    items: &[T],
    jobs: usize,
    label: impl Fn(&T) -> String + Sync,
    work: impl Fn(&T) -> Result<()> + Sync,
    pb: &ProgressBar,
) -> Vec<(String, String)> {
    let jobs = jobs.min(items.len()).max(1);
    let threads = candle_core::utils::get_num_threads();
    let per_job = (threads / jobs).max(1);
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<Event>();
    let mut failures = Vec::new();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let tx = tx.clone();
            let (next, label, work) = (&next, &label, &work);
            scope.spawn(move || {
                let pool = match rayon::ThreadPoolBuilder::new().num_threads(per_job).build() {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Event::Failed("(worker)".into(), e.to_string()));
                        return;
                    }
                };
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(item) = items.get(i) else { break };
                    let name = label(item);
                    let _ = tx.send(Event::Started(name.clone()));
                    let result = pool.install(|| work(item));
                    let _ = tx.send(match result {
                        Ok(()) => Event::Done,
                        Err(e) => {
                            let msg: Vec<String> =
                                e.chain().map(|c| c.to_string().lines().next().unwrap_or("").to_string()).collect();
                            Event::Failed(name, msg.join(": "))
                        }
                    });
                }
            });
        }
        drop(tx);
        for event in rx {
            match event {
                Event::Started(p) => pb.set_message(p),
                Event::Done => pb.inc(1),
                Event::Failed(p, e) => {
                    pb.inc(1);
                    pb.suspend(|| eprintln!("failed: {p}: {e}"));
                    failures.push((p, e));
                }
            }
        }
    });
    failures.sort();
    failures
}
