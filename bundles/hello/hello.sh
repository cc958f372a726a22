#!/bin/sh
# The hello agent: shows what the jail looks like from inside.
echo "hello from the jail"
echo "  my pid:        $$ (pid 1 of my own pid namespace)"
echo "  hostname:      $(hostname)"
echo "  processes:     $(ls -d /proc/[0-9]* | wc -l) visible"
echo "  interfaces:    $(ls /sys/class/net | tr '\n' ' ')"
echo "  uid inside:    $(id -u) (mapped to an unprivileged host user)"
echo "agent was here" > /etc/agent-wrote-this
echo "  wrote /etc/agent-wrote-this (lands in the overlay upper dir, not in the bundle)"
if mount -t tmpfs none /mnt 2>/dev/null; then echo "  mount: ALLOWED (unexpected)"; else echo "  mount:         denied by seccomp"; fi
