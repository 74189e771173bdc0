//! The bare-Redis baseline `mas-load --baseline` prints beside every figure: the same shape of
//! load straight on Redis Streams, with no broker logic at all. Producers keep `window`
//! `XADD`s in flight each (one multiplexed connection, like the broker's); consumers read
//! with `XREADGROUP COUNT 256` and settle each batch with one pipelined `XACK` + `XDEL` (what
//! the broker does with an acked entry). The ratio mas / baseline is what a report states:
//! absolute figures on this machine move with its noise, the ratio much less.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, IntoConnectionInfo};

/// The shape of one baseline run.
#[derive(Debug, Clone)]
pub struct BaselineLoad {
    /// Redis URL.
    pub url: String,
    /// Messages in total.
    pub messages: u64,
    /// Producer connections.
    pub producers: u64,
    /// Appends in flight at once, over all producers.
    pub concurrency: u64,
    /// Consumers in one group.
    pub consumers: u64,
    /// Payload bytes per entry.
    pub payload: usize,
}

/// What a baseline run measured.
#[derive(Debug, Clone)]
pub struct BaselineReport {
    /// Until every message was read and acknowledged.
    pub elapsed: Duration,
    /// Append → read latencies, sorted, in nanoseconds.
    pub latencies_ns: Vec<u64>,
}

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let info = url.into_connection_info()?.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info)?.get_multiplexed_async_connection().await
}

/// CPU seconds (user + system) the Redis server at `url` has used so far (`INFO cpu`), so a
/// run can state Redis's CPU per message beside the broker's.
pub async fn redis_cpu_seconds(url: &str) -> anyhow::Result<f64> {
    let mut con = connect(url).await?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut con).await?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':'));
        Ok(line.ok_or_else(|| anyhow::anyhow!("INFO cpu has no {name}"))?.trim().parse()?)
    };
    Ok(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// Runs the baseline on a fresh stream (deleted afterwards).
pub async fn run(load: BaselineLoad) -> anyhow::Result<BaselineReport> {
    let stream = format!("mas-baseline:{}:{}", std::process::id(), rand_suffix());
    let mut admin = connect(&load.url).await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await?;
    let epoch = Instant::now();
    let filler = "x".repeat(load.payload.saturating_sub(24));
    let consumed = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for c in 0..load.consumers {
        let (url, stream, consumed, total) = (load.url.clone(), stream.clone(), consumed.clone(), load.messages);
        consumers.push(tokio::spawn(async move {
            let mut con = connect(&url).await?;
            let options = StreamReadOptions::default().group("g", format!("c{c}")).count(256).block(100);
            let mut latencies = Vec::new();
            while consumed.load(Ordering::Relaxed) < total {
                let reply: StreamReadReply = con.xread_options(&[&stream], &[">"], &options).await?;
                let ids: Vec<String> = reply
                    .keys
                    .into_iter()
                    .flat_map(|k| k.ids)
                    .map(|entry| {
                        if let Some(redis::Value::BulkString(sent)) = entry.map.get("t")
                            && let Some(sent) = std::str::from_utf8(sent).ok().and_then(|s| s.parse::<u64>().ok())
                        {
                            latencies.push((epoch.elapsed().as_nanos() as u64).saturating_sub(sent));
                        }
                        entry.id
                    })
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let _: () = redis::pipe()
                    .xack(&stream, "g", &ids)
                    .ignore()
                    .xdel(&stream, &ids)
                    .ignore()
                    .query_async(&mut con)
                    .await?;
                consumed.fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(latencies)
        }));
    }
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut producers = Vec::new();
    for p in 0..load.producers {
        let con = connect(&load.url).await?;
        let windows = load.concurrency / load.producers + u64::from(p < load.concurrency % load.producers);
        for _ in 0..windows {
            let (mut con, stream, next, filler, total) =
                (con.clone(), stream.clone(), next.clone(), filler.clone(), load.messages);
            producers.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let sent = (epoch.elapsed().as_nanos() as u64).to_string();
                    let _: String = con.xadd(&stream, "*", &[("t", sent.as_str()), ("p", filler.as_str())]).await?;
                }
                anyhow::Ok(())
            }));
        }
    }
    for producer in producers {
        producer.await??;
    }
    let mut latencies_ns = Vec::new();
    for consumer in consumers {
        latencies_ns.extend(consumer.await??);
    }
    let elapsed = started.elapsed();
    let _: () = admin.del(&stream).await?;
    latencies_ns.sort_unstable();
    Ok(BaselineReport { elapsed, latencies_ns })
}

/// A suffix that keeps concurrent runs in one process apart.
fn rand_suffix() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}
