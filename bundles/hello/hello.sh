#!/bin/sh
# The hello agent: shows what the jail looks like from inside.
echo "hello from the jail"
echo "  my pid:        $$ (pid 1 of my own pid namespace)"
echo "  hostname:      $(hostname)"
echo "  processes:     $(ls -d /proc/[0-9]* | wc -l) visible (the host has many more)"
echo "  interfaces:    $(ls /sys/class/net | tr '\n' ' ')"
echo "  uid inside:    $(id -u) (an unprivileged user outside)"
echo "  capabilities:  $(grep CapEff /proc/self/status | cut -f2)"
if echo "agent was here" > /etc/agent-wrote-this 2>/dev/null; then
  echo "  wrote:         /etc/agent-wrote-this (lands in the overlay upper dir, not in the bundle)"
else
  echo "  wrote:         nothing, /etc is not writable here"
fi
if mount -t tmpfs none /mnt 2>/dev/null; then echo "  mount:         ALLOWED (unexpected)"; else echo "  mount:         refused (seccomp + no capabilities)"; fi
if wget -q -T 2 -O /dev/null http://198.51.100.1/ 2>/dev/null; then echo "  network:       REACHED the outside (unexpected)"; else echo "  network:       no way out (loopback only)"; fi
