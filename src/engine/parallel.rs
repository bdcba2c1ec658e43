//! Independent jobs spread over the cores, their results in job order whatever ran where.

/// `job(0..jobs)` on up to as many threads as there are cores, jobs interleaved (`t`, `t +
/// threads`, ...) so that jobs growing in cost spread evenly; results in job order. A job that
/// panics panics the caller.
pub fn map_interleaved<T: Send>(jobs: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, jobs.max(1));
    if threads == 1 {
        return (0..jobs).map(job).collect();
    }
    let mut done: Vec<(usize, T)> = std::thread::scope(|scope| {
        let job = &job;
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..jobs)
                        .step_by(threads)
                        .map(|i| (i, job(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, result)| result).collect()
}
