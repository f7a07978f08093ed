#!/usr/bin/env bash
# Debian packages the tests need, installed when missing (make test runs this; the machine runs as root):
#   postgresql  - initdb/pg_ctl binaries: the tests start their own server in a temp dir
#   chromium    - headless browser: a test renders the night report and checks its images load
#   graphviz    - dot: the report's rule graph
#   slurm-wlm, munge - slurmctld, slurmd, sbatch/squeue and munged: tests/test_slurm.py starts a real
#                 single-node SLURM cluster in a temp dir (stream_shim/testbed/slurm_cluster.py)
set -uo pipefail
missing=""
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v dot >/dev/null 2>&1 || missing="$missing graphviz"
command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 || missing="$missing slurm-wlm"
command -v munged >/dev/null 2>&1 || missing="$missing munge"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "install_test_packages: need root to install:$missing (apt-get install$missing)" >&2
    exit 1
fi
echo "install_test_packages: installing$missing (Debian packages; a minute or two)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq $missing >/dev/null || {
    echo "install_test_packages: could not install$missing" >&2
    exit 1
}
