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
    let groups: Vec<Vec<&T>> = items.iter().map(|x| vec![x]).collect();
    for_each_group(&groups, jobs, |x| label(x), |g| vec![work(g[0])], pb)
}

/// Groups of at most `size` items sharing `key` (a batch of generations shares its
/// duration), in the items' order within each key.
pub fn batches<T: Clone>(items: &[T], size: usize, key: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let mut sorted: Vec<T> = items.to_vec();
    sorted.sort_by_key(|x| key(x));
    let mut out: Vec<Vec<T>> = Vec::new();
    for x in sorted {
        match out.last_mut() {
            Some(g) if g.len() < size.max(1) && key(&g[0]) == key(&x) => g.push(x),
            _ => out.push(vec![x]),
        }
    }
    out
}

/// `for_each` over groups of items processed together: `work` gives one result per
/// item of its group; the bar counts items and failures name items.
pub fn for_each_group<T: Sync>(
    groups: &[Vec<T>],
    jobs: usize,
    label: impl Fn(&T) -> String + Sync,
    work: impl Fn(&[T]) -> Vec<Result<()>> + Sync,
    pb: &ProgressBar,
) -> Vec<(String, String)> {
    let jobs = jobs.min(groups.len()).max(1);
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
                    let Some(group) = groups.get(i) else { break };
                    let names: Vec<String> = group.iter().map(label).collect();
                    let _ = tx.send(Event::Started(names.join(", ")));
                    let mut results = pool.install(|| work(group)).into_iter();
                    for name in names {
                        let result = results.next().unwrap_or_else(|| Err(anyhow::anyhow!("no result")));
                        let _ = tx.send(match result {
                            Ok(()) => Event::Done,
                            Err(e) => {
                                let msg: Vec<String> =
                                    e.chain().map(|c| c.to_string().lines().next().unwrap_or("").to_string()).collect();
                                Event::Failed(name, msg.join(": "))
                            }
                        });
                    }
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
