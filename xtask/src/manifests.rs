//! `cargo xtask manifests`: renders the Kubernetes manifests of `deploy/` (a kustomize base)
//! as `kubectl apply -k deploy/` would apply them, writes the render to
//! `target/manifests/ztunnel.yaml`, and validates it offline against the API's schemas.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use ztunnel_lab::topology;

/// The Kubernetes version whose schemas the render must satisfy (kubernetes-validate ships
/// them): the oldest the DaemonSet is meant for.
pub const KUBERNETES_VERSION: &str = "1.31.0";

/// Renders and validates the manifests.
pub fn run() -> Result<()> {
    let root = topology::workspace_root();
    let render = render(&root)?;
    let out_dir = root.join("target/manifests");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("ztunnel.yaml");
    std::fs::write(&out, &render).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "manifests: rendered {} resources to {}",
        resources(&render),
        out.display()
    );
    validate(&out)?;
    println!("manifests: valid for Kubernetes {KUBERNETES_VERSION} (strict)");
    Ok(())
}

/// `kubectl kustomize deploy/`.
fn render(root: &Path) -> Result<String> {
    println!("manifests: kubectl kustomize deploy/");
    let output = quiet(
        Command::new("kubectl")
            .current_dir(root)
            .args(["kustomize", "deploy/"]),
    )
    .context("running kubectl (`cargo xtask setup` installs it)")?;
    if !output.status.success() {
        bail!(
            "kubectl kustomize deploy/ failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("kubectl kustomize printed something not UTF-8")
}

/// kubernetes-validate with its bundled schemas (no cluster, no network); `--strict` refuses
/// fields the schema does not know, so a misspelt one fails instead of being dropped.
fn validate(file: &Path) -> Result<()> {
    println!("manifests: kubernetes-validate --strict -k {KUBERNETES_VERSION}");
    let output = quiet(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
            .arg(KUBERNETES_VERSION)
            .arg(file),
    )
    .context("running python3 -m kubernetes_validate (`cargo xtask setup` installs it)")?;
    let report = [&output.stdout[..], &output.stderr[..]].concat();
    let report = String::from_utf8_lossy(&report);
    if !output.status.success() {
        bail!(
            "{} is not valid for Kubernetes {KUBERNETES_VERSION} ({}):\n{}",
            file.display(),
            output.status,
            report.trim()
        );
    }
    // Warnings (e.g. a deprecated field) are worth reading even when the render is valid.
    print!("{report}");
    Ok(())
}

/// The YAML documents in a render.
fn resources(render: &str) -> usize {
    render
        .split("\n---\n")
        .filter(|doc| !doc.trim().is_empty())
        .count()
}

fn quiet(command: &mut Command) -> std::io::Result<Output> {
    command.stdin(Stdio::null()).output()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_render_counts_its_documents() {
        assert_eq!(resources(""), 0);
        assert_eq!(resources("kind: A\n"), 1);
        assert_eq!(resources("kind: A\n---\nkind: B\n---\nkind: C\n"), 3);
    }
}
