#!/usr/bin/perl
# Perl's Cache::FastMmap as a benchmark peer for benchmarks/run.py.
#
# Reads one JSON object on stdin, prints one JSON object on stdout.  Modes:
#   bench     create the cache in the parent, prefill the working set, then for
#             each workload fork nprocs workers, start them together (a pipe
#             barrier) and let each run the same loop shape as run.py's Python
#             workers: chunks of `chunk` ops, the first op of each chunk timed.
#             Prints {workload: [per-worker record, ...]}.
#   zipf      read-through over a request sequence (packed uint32 key ids):
#             get, and set on a miss.  Prints {hits, counted}.
#   overhead  one page, insert distinct keys until the first eviction.
#             Prints {entries, cache_size}.
use strict;
use warnings;
use Cache::FastMmap;
use JSON::PP;
use POSIX ();
use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC);

my $cfg = decode_json(do { local $/; <STDIN> });
my $mode = $cfg->{mode};
my %out;
if    ($mode eq 'bench')    { %out = bench($cfg) }
elsif ($mode eq 'zipf')     { %out = zipf($cfg) }
elsif ($mode eq 'overhead') { %out = overhead($cfg) }
else                        { die "unknown mode $mode\n" }
print encode_json(\%out), "\n";
exit 0;

sub make_value {
    my ($c) = @_;
    # the small dict of run.py, as a Perl hash (stored through Storable)
    return { id => 12345, name => 'alice', tags => ['a', 'b'], score => 3.14, active => 1 }
        if $c->{value} eq 'dict';
    srand(1);
    return join '', map { chr(int(rand(256))) } 1 .. $c->{value};
}

sub new_cache {
    my ($c, %extra) = @_;
    return Cache::FastMmap->new(
        share_file     => $c->{share_file},
        init_file      => 1,
        unlink_on_exit => 1,
        ($c->{value} eq 'dict' ? (serializer => 'storable') : (serializer => '')),
        %extra,
    );
}

sub hit_key  { sprintf('k%015d', $_[0]) }
sub miss_key { sprintf('m%015d', $_[0]) }

sub now { clock_gettime(CLOCK_MONOTONIC) }

sub bench {
    my ($c) = @_;
    my $cache = new_cache($c, cache_size => $c->{cache_size}, page_size => $c->{page_size});
    my $value = make_value($c);
    my @keys = map { hit_key($_) } 0 .. $c->{nkeys} - 1;
    $cache->set($_, $value) for @keys;
    my %res;
    for my $wl (@{ $c->{workloads} }) {
        $res{$wl} = run_workers($c, $cache, $wl, \@keys, $value);
    }
    return %res;
}

sub run_workers {
    my ($c, $cache, $wl, $keys, $value) = @_;
    my $n = $c->{nprocs};
    pipe(my $ready_r, my $ready_w) or die "pipe: $!";
    pipe(my $go_r, my $go_w) or die "pipe: $!";
    my @pids;
    for my $wid (0 .. $n - 1) {
        my $pid = fork();
        die "fork: $!" unless defined $pid;
        if (!$pid) {
            close $ready_r; close $go_w;
            my $ready = 0;
            my $rec = eval { worker($c, $cache, $wl, $wid, $keys, $value, $ready_w, $go_r, \$ready) };
            $rec = { error => "$@" } unless $rec;
            syswrite($ready_w, 'r', 1) unless $ready;    # never leave the parent waiting
            open my $fh, '>', "$c->{tmpdir}/$wl-$wid.json" or POSIX::_exit(3);
            print $fh encode_json($rec);
            close $fh;
            POSIX::_exit(0);    # no DESTROY, no END in the workers
        }
        push @pids, $pid;
    }
    close $ready_w; close $go_r;
    my $got = 0;
    while ($got < $n) {
        my $r = sysread($ready_r, my $buf, $n - $got);
        die "a worker died before the barrier\n" unless $r;
        $got += $r;
    }
    close $go_w;    # EOF on go_r releases every worker at once
    waitpid($_, 0) for @pids;
    my @recs;
    for my $wid (0 .. $n - 1) {
        open my $fh, '<', "$c->{tmpdir}/$wl-$wid.json" or die "worker $wid left no result\n";
        push @recs, decode_json(do { local $/; <$fh> });
    }
    return \@recs;
}

# Same shape as run.py: chunks of $chunk ops; the first op of each chunk is
# timed (one clock read before and after), the rest run untimed.
sub worker {
    my ($c, $cache, $wl, $wid, $keys, $value, $ready_w, $go_r, $ready) = @_;
    my $chunk = $c->{chunk};
    my $nchunks = int($c->{nops} / $chunk);
    srand($c->{seed} + 7919 * $wid);
    my $nk = @$keys;
    my @chunks;
    for (1 .. $nchunks) {
        my @ops;
        for (1 .. $chunk) {
            my $i = int(rand($nk));
            if ($wl eq 'get_miss') { push @ops, [0, miss_key($i)] }
            elsif ($wl eq 'set')   { push @ops, [1, $keys->[$i]] }
            elsif ($wl eq 'mix')   { push @ops, [rand() < $c->{mix_set_fraction} ? 1 : 0, $keys->[$i]] }
            else                   { push @ops, [0, $keys->[$i]] }
        }
        push @chunks, \@ops;
    }
    # warm-up, untimed
    for my $ch (@chunks[0 .. ($c->{warmup_chunks} < $nchunks ? $c->{warmup_chunks} : $nchunks) - 1]) {
        for my $op (@$ch) { $op->[0] ? $cache->set($op->[1], $value) : $cache->get($op->[1]) }
    }
    syswrite($ready_w, 'r', 1);
    $$ready = 1;
    sysread($go_r, my $buf, 1);    # blocks until the parent closes the pipe

    my (@lat_get, @lat_set);
    my ($n, $none, $sets, $set_false) = (0, 0, 0, 0);
    my $t_start = now();
    my $deadline = $t_start + $c->{duration_ns} / 1e9;
    my $t1;
    OUTER: while (1) {
        for my $ch (@chunks) {
            my ($s, $k) = @{ $ch->[0] };
            if ($s) {
                my $t0 = now(); my $r = $cache->set($k, $value); $t1 = now();
                push @lat_set, $t1 - $t0;
                $sets++;
                $set_false++ unless $r;
            } else {
                my $t0 = now(); my $r = $cache->get($k); $t1 = now();
                push @lat_get, $t1 - $t0;
                $none++ unless defined $r;
            }
            for my $i (1 .. $#$ch) {
                my $op = $ch->[$i];
                if ($op->[0]) {
                    $sets++;
                    $set_false++ unless $cache->set($op->[1], $value);
                } else {
                    $none++ unless defined $cache->get($op->[1]);
                }
            }
            $n++;
            last OUTER if $t1 >= $deadline;
        }
    }
    my $t_end = now();
    my $ns = sub { [ map { int($_ * 1e9 + 0.5) } @{ $_[0] } ] };
    return {
        ops        => $n * $chunk,
        t_start_ns => int($t_start * 1e9),
        t_end_ns   => int($t_end * 1e9),
        lat_get    => $ns->(\@lat_get),
        lat_set    => $ns->(\@lat_set),
        get_none   => $none,
        sets       => $sets,
        set_false  => $set_false,
    };
}

sub zipf {
    my ($c) = @_;
    my $cache = new_cache($c, page_size => $c->{page_size}, num_pages => $c->{num_pages});
    my $value = make_value($c);
    open my $fh, '<:raw', $c->{requests} or die "$c->{requests}: $!";
    my @req = unpack('V*', do { local $/; <$fh> });
    my ($hits, $counted) = (0, 0);
    my $warm = $c->{warmup};
    for my $j (0 .. $#req) {
        my $k = hit_key($req[$j]);
        if (defined $cache->get($k)) {
            $hits++ if $j >= $warm;
        } else {
            $cache->set($k, $value);
        }
        $counted++ if $j >= $warm;
    }
    return (hits => $hits, counted => $counted, cache_size => $cache->{cache_size});
}

sub overhead {
    my ($c) = @_;
    my $cache = new_cache($c, page_size => $c->{page_size}, num_pages => 1);
    my $value = make_value($c);
    my $i = 0;
    while (1) {
        $cache->set(hit_key($i), $value);
        my $count = () = $cache->get_keys(0);
        last if $count < $i + 1;
        $i++;
    }
    return (entries => $i, cache_size => $cache->{cache_size});
}
