//! A plugin that misbehaves on purpose, chosen by `config.mode`, for the sandbox tests.
//! It implements the interface directly (not through the SDK's `Filter`), so it can also break
//! the contract in ways the SDK would not let it.
//!
//! Modes: `loop` (never returns), `memory` (allocates without end), `probe` (replaces each record
//! with what it could see of the outside world), `panic` (panics on a record whose `id` is
//! `config.at`), `short` (one verdict fewer than records), `err` (returns an error for records with
//! `"bad": true`), `keep`; and the ones that walked past the sandbox once: `sleep` (sleeps
//! `config.secs` in every call), `huge` (replaces each record whose `id` is a multiple of
//! `config.every` with one of `config.mb` MiB), `bigerr` (returns an error of `config.mb` MiB), `sample` (keeps a record
//! when a random byte is below 128, adding the byte as `draw`).

use std::cell::RefCell;

use ladle_plugin::bindings::exports::ladle::filter::filter::{Guest, Verdict};
use ladle_plugin::serde_json::{self, Value, json};

thread_local! {
    static CONFIG: RefCell<Value> = const { RefCell::new(Value::Null) };
}

struct Hostile;

fn probe() -> Value {
    let file = match std::fs::read_to_string("/etc/passwd") {
        Ok(_) => "read".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(u64::MAX);
    let tcp = match std::net::TcpStream::connect("127.0.0.1:9") {
        Ok(_) => "connected".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let mut seed = std::collections::hash_map::RandomState::new();
    let _ = &mut seed;
    json!({"file": file, "env": env, "now": now, "tcp": tcp})
}

impl Guest for Hostile {
    fn configure(config: String) -> Result<(), String> {
        let v: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        if v["mode"].as_str().is_none() {
            return Err("config needs a `mode`".into());
        }
        CONFIG.with(|c| *c.borrow_mut() = v);
        Ok(())
    }

    fn filter(batch: Vec<String>) -> Result<Vec<Verdict>, String> {
        let config = CONFIG.with(|c| c.borrow().clone());
        let mode = config["mode"].as_str().unwrap_or("keep").to_string();
        match mode.as_str() {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if x == 0 {
                        return Ok(vec![]);
                    }
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    if hoard.len() == usize::MAX {
                        return Ok(vec![]);
                    }
                }
            }
            "probe" => Ok(batch.iter().map(|_| Verdict::Replace(probe().to_string())).collect()),
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs_f64(config["secs"].as_f64().unwrap_or(1.0)));
                Ok(batch.iter().map(|_| Verdict::Keep).collect())
            }
            "huge" => {
                let mb = config["mb"].as_u64().unwrap_or(60) as usize;
                let every = config["every"].as_u64().unwrap_or(1);
                batch
                    .iter()
                    .map(|text| {
                        let record: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
                        if record["id"].as_u64().is_none_or(|id| id % every != 0) {
                            return Ok(Verdict::Keep);
                        }
                        // Built in place: one allocation of the record's size.
                        let mut huge = String::with_capacity((mb << 20) + 16);
                        huge.push_str("{\"filler\":\"");
                        (0..mb << 20).for_each(|_| huge.push('x'));
                        huge.push_str("\"}");
                        Ok(Verdict::Replace(huge))
                    })
                    .collect()
            }
            "bigerr" => Err("e".repeat((config["mb"].as_u64().unwrap_or(100) as usize) << 20)),
            "sample" => batch
                .iter()
                .map(|text| {
                    let mut record: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
                    let mut byte = [0u8; 1];
                    getrandom::fill(&mut byte).map_err(|e| e.to_string())?;
                    record["draw"] = json!(byte[0]);
                    Ok(if byte[0] < 128 { Verdict::Replace(record.to_string()) } else { Verdict::Drop })
                })
                .collect(),
            "short" => Ok(batch.iter().skip(1).map(|_| Verdict::Keep).collect()),
            _ => batch
                .iter()
                .map(|text| {
                    let record: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
                    if mode == "panic" && record["id"] == config["at"] {
                        panic!("boom at record id {}", record["id"]);
                    }
                    if mode == "err" && record["bad"] == json!(true) {
                        return Err(format!("cannot handle record id {}", record["id"]));
                    }
                    Ok(Verdict::Keep)
                })
                .collect(),
        }
    }
}

ladle_plugin::bindings::export!(Hostile with_types_in ladle_plugin::bindings);
