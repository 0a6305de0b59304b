//! The opsbox side of the queue benchmarks (`queues`, `queues-pg`): one client of the
//! native queue API over HTTP/1.1 keep-alive, one connection, push → pull → ack cycles
//! on its own queue with every answer checked.

use std::time::Duration;

use anyhow::{anyhow, ensure};
use serde_json::{json, Value};

pub struct QueueClient {
    pub http: reqwest::Client,
    pub push: String,
    pub pull: String,
    pub ack: String,
    n: u64,
}

impl QueueClient {
    pub fn new(base: &str, node: &str) -> anyhow::Result<Self> {
        Ok(QueueClient {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .http1_only()
                .timeout(Duration::from_secs(30))
                .build()?,
            push: format!("{base}/v1/queues/{node}/messages"),
            pull: format!("{base}/v1/queues/{node}/pull"),
            ack: format!("{base}/v1/queues/{node}/ack"),
            n: 0,
        })
    }

    pub async fn post(&self, url: &str, body: &Value, status: u16) -> anyhow::Result<Value> {
        let response = self.http.post(url).json(body).send().await?;
        let got = response.status().as_u16();
        let text = response.text().await?;
        ensure!(got == status, "{url} answered {got}, not {status}: {text}");
        Ok(serde_json::from_str(&text)?)
    }

    /// One message through the queue: push, pull it back, ack it.
    pub async fn cycle(&mut self) -> anyhow::Result<()> {
        self.n += 1;
        let pushed = self
            .post(
                &self.push,
                &json!({"messages": [{"payload": {"n": self.n}}]}),
                201,
            )
            .await?;
        let id = pushed["messages"][0]["id"]
            .as_str()
            .ok_or_else(|| anyhow!("push answered no message id: {pushed}"))?
            .to_owned();
        let pulled = self.post(&self.pull, &json!({"max": 1}), 200).await?;
        let got = pulled["messages"][0]["id"].as_str();
        ensure!(got == Some(&id), "pushed {id}, pulled {pulled}");
        let acked = self.post(&self.ack, &json!({"ids": [id]}), 200).await?;
        ensure!(
            acked["acked"].as_array().map(Vec::len) == Some(1),
            "ack of {id} answered {acked}"
        );
        Ok(())
    }
}
