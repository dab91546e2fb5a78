//! A real browser for end-to-end tests: headless Chromium (Debian's `chromium`), driven
//! over WebDriver by `chromedriver` (Debian's `chromium-driver`) on a free port, both
//! killed on drop. The test command installs them (`ops/scripts/install-deps.sh`).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::{eventually, free_port};

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// Where Debian's package puts the browser itself (`/usr/bin/chromium` is a wrapper
/// script); `CHROMIUM_BIN` overrides.
fn chromium_bin() -> String {
    if let Ok(bin) = std::env::var("CHROMIUM_BIN") {
        return bin;
    }
    for bin in [
        "/usr/lib/chromium/chromium",
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
    ] {
        if std::path::Path::new(bin).exists() {
            return bin.into();
        }
    }
    "chromium".into()
}

impl Browser {
    /// A fresh browser (its own profile: no cookies) with a window of `width`×`height`
    /// CSS pixels (412×915 is a phone).
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Browser> {
        let port = free_port()?;
        let driver = Command::new(std::env::var("CHROMEDRIVER_BIN").unwrap_or_else(|_| "chromedriver".into()))
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so the browsers it starts are killed with it.
            .process_group(0)
            .spawn()
            .context("cannot start chromedriver (Debian: apt-get install chromium-driver; the test command installs it)")?;
        let profile = tempfile::tempdir()?;
        let mut browser = BrowserStarting {
            driver: Some(driver),
        };
        let url = format!("http://127.0.0.1:{port}");
        // (chromedriver does not speak HTTP/1.0, so `http_get` cannot ask its /status.)
        eventually(
            Duration::from_secs(20),
            "chromedriver to listen",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await?;
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium_bin(),
                // A phone's viewport and pixel ratio (a headless window is never
                // narrower than 500 px).
                "mobileEmulation": {
                    "deviceMetrics": {"width": width, "height": height, "pixelRatio": 2.0},
                },
                "args": [
                    "--headless=new",
                    // Tests run as root in containers, where the sandbox cannot start.
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .context("cannot open a Chromium session through chromedriver")?;
        let driver = browser.driver.take().context("driver")?;
        Ok(Browser {
            client,
            driver,
            _profile: profile,
        })
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await?;
        Ok(())
    }

    /// Waits until an element matching `css` is displayed, and returns its text.
    pub async fn wait_visible(&self, css: &str, within: Duration) -> anyhow::Result<String> {
        self.wait_text(css, within, |_| true).await
    }

    /// Waits until an element matching `css` is displayed with text that satisfies
    /// `ok`; returns the text. (Bounded: the last text seen is in the error.)
    pub async fn wait_text(
        &self,
        css: &str,
        within: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let last = std::sync::Mutex::new(String::from("(never found)"));
        let found = eventually(within, &format!("`{css}` in the page"), || async {
            let el = self.client.find(Locator::Css(css)).await.ok()?;
            if !el.is_displayed().await.ok()? {
                return None;
            }
            let text = el.text().await.ok()?;
            if let Ok(mut l) = last.lock() {
                l.clone_from(&text);
            }
            ok(&text).then_some(text)
        })
        .await;
        match found {
            Ok(text) => Ok(text),
            Err(e) => {
                let seen = last.lock().map(|l| l.clone()).unwrap_or_default();
                bail!("{e}; its last text: {seen:?}")
            }
        }
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("no `{css}` to click"))?
            .click()
            .await
            .with_context(|| format!("cannot click `{css}`"))?;
        Ok(())
    }

    /// Clears the field matching `css` and types `text` into it.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let el = self
            .client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("no `{css}` to type into"))?;
        el.clear().await?;
        el.send_keys(text).await?;
        Ok(())
    }

    /// The page's whole HTML as the browser holds it now.
    pub async fn source(&self) -> anyhow::Result<String> {
        Ok(self.client.source().await?)
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.client.screenshot().await?)
    }

    /// Ends the WebDriver session (the browser quits), then the driver.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let client = self.client.clone();
        client.close().await?;
        kill_group(&mut self.driver);
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

/// Holds the driver while the session is being opened, so a failed start kills it.
struct BrowserStarting {
    driver: Option<Child>,
}

impl Drop for BrowserStarting {
    fn drop(&mut self) {
        if let Some(driver) = &mut self.driver {
            kill_group(driver);
        }
    }
}

fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}
